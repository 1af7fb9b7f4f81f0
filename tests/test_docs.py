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


def test_docs_validation_cost_is_the_dry_runs():
    """docs/evaluation.md's validation cost of SD3-medium on 8 GPUs is what the dry run prints."""
    from ladd_ds.config import load_config
    from ladd_ds.ladd.build import as_engines_hold, build_models, step_activations, validation_plan

    cfg = load_config(REPO / "configs" / "sd3_medium.yaml")
    teacher, student, heads, taps = build_models(cfg, device="meta")
    models = {"teacher": teacher, "student": student, "heads": heads}
    as_engines_hold(cfg, models)
    lines = validation_plan(cfg, 8, models, taps, step_activations(cfg, models, flops=True))
    docs = (REPO / "docs" / "evaluation.md").read_text()
    assert "\n".join("  " + line for line in lines) in docs
    share = re.search(r"validation is ([0-9.]+%) of the compute", lines[-1]).group(1)
    assert f"**{share} of the compute**" in docs


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Everything that may send a reader to a named section: code, configs, scripts, tests and the docs.
# This file is left out: its own patterns and messages are not pointers.
NAMING = [
    *SOURCES,
    *(REPO / "docs").glob("*.md"),
    *REPO.glob("launchers/*"),
    *REPO.glob("evaluation/*.sh"),
    *(p for p in REPO.glob("tests/*.py") if p.name != "test_docs.py"),
]
# README, "Section" / README ("Section") / docs/file.md, "Section": the name may wrap onto the next
# line, in a Python or shell comment too.
NAMED_SECTION = re.compile(r'(README(?:\.md)?|docs/[\w-]+\.md),?\s+\(?"([^"]+)"')
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headings(text: str) -> list[str]:
    """The document's headings without their '#'s, outside code blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [h.strip() for h in re.findall(r"^#+ (.+)$", text, re.M)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_every_named_section_exists():
    """A pointer such as README, "Architecture" or a section of a docs/ file names a heading of
    that file (its start; a numbered heading's number left out) or a bold paragraph label: sections
    moved out of the README must be pointed at where they are now."""
    seen = 0
    for source in NAMING:
        for target, name in NAMED_SECTION.findall(source.read_text()):
            name = " ".join(re.sub(r"\n\s*#?", " ", name).split())
            path = REPO / ("README.md" if target.startswith("README") else target)
            assert path.is_file(), f"{source.relative_to(REPO)} points to {target}, which does not exist"
            text = path.read_text()
            titles = [re.sub(r"^\d+\.\s+", "", h) for h in headings(text)]
            found = any(t.startswith(name) for t in titles) or f"**{name}" in " ".join(text.split())
            assert found, f'{source.relative_to(REPO)} points to {target}, "{name}": no such section there'
            seen += 1
    assert seen >= 20  # the pointers are there (a broken regex would find nothing)


def test_every_link_between_the_docs_resolves():
    """Relative links in README.md and docs/*.md reach an existing file, and a #fragment one of its
    headings."""
    seen = 0
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
        for link in MD_LINK.findall(text):
            if re.match(r"[a-z]+:", link):
                continue  # http(s) and other external links
            file, _, fragment = link.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.is_file(), f"{doc.relative_to(REPO)}: the link {link} reaches no file"
            if fragment:
                anchors = {slug(h) for h in headings(path.read_text())}
                assert fragment in anchors, f"{doc.relative_to(REPO)}: the link {link}: no heading has the anchor #{fragment}"
            seen += 1
    assert seen >= 10


def test_ci_runs_the_readmes_install_and_test_commands():
    """.ci/run runs the README's install command and its test command ("The three commands": the
    first and last bash blocks), so that CI tests what a user types."""
    section = (REPO / "README.md").read_text().split("\n## The three commands\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(blocks) == 3, f'README "The three commands": expected 3 bash blocks, found {len(blocks)}'
    install, _, test = blocks
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci, f".ci/run does not run the README's install command {install!r}"
    assert any(line == test or line.endswith(f" {test}") or f" {test} " in line for line in ci), (
        f".ci/run does not run the README's test command {test!r}"
    )
