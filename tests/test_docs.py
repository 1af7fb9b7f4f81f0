"""The repository documents itself: every pointer into docs/ from code, configs and the README
names a file and section that exist, and nothing points to notes outside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*REPO.glob("ladd_ds/**/*.py"), *REPO.glob("evaluation/*.py"), *REPO.glob("configs/*.yaml"), REPO / "README.md"]
POINTER = re.compile(r"docs/([\w-]+\.md)(?:, sections? (\d+))?")


def test_every_docs_pointer_names_an_existing_section():
    seen = 0
    for source in SOURCES:
        for doc, section in POINTER.findall(source.read_text()):
            path = REPO / "docs" / doc
            assert path.is_file(), f"{source.relative_to(REPO)} points to docs/{doc}, which does not exist"
            if section:
                assert re.search(rf"^## {section}\. ", path.read_text(), re.M), (
                    f"{source.relative_to(REPO)}: docs/{doc} has no section {section}"
                )
            seen += 1
    assert seen >= 10  # the code does point there (a broken regex would find nothing)


def test_no_pointer_to_notes_outside_the_repository():
    for source in SOURCES + list(REPO.glob("docs/*.md")):
        text = source.read_text()
        for needle in ("DESIGN.md", "STYLE.md", "../shared"):
            assert needle not in text, f"{source.relative_to(REPO)} mentions {needle}, which users do not have"


def test_docs_memory_plan_tables_are_the_scripts():
    """docs/performance.md's memory plans of the SD3 configs are what evaluation/plan_tables.py
    computes (the dry run's planning function), not typed in."""
    from evaluation.plan_tables import live_rows, rows

    docs = (REPO / "docs" / "performance.md").read_text()
    assert "\n".join(rows()) in docs
    assert "\n".join(live_rows()) in docs
