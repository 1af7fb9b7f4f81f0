"""A user's paths are theirs: what a command may write to, and the marker that makes a folder ours.

Every folder a command writes as a whole (an export, a teacher, a dataset, a demo output, a run
directory) gets a small marker file, OUTPUT_MARKER, naming its kind and where it came from.
Before writing, `check_output` decides:
- nothing there, or an empty folder: write;
- our marker of the same kind and the same source (e.g. an export of the same run): replace or
  continue it;
- our marker of the same kind from another source: only with `--overwrite`;
- anything else (a file, a folder we did not write, an output of another kind such as a run
  directory given as an export's --out): refuse with OutputExistsError, saying what is there.

Outputs written by versions of ladd-ds before the marker are recognised by the files they always
held (LEGACY_FILES), so that a re-run still replaces or continues them.

The marker is not named *.json: streaming reads every .json under a dataset bucket as an index.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ladd_ds.core.errors import OutputExistsError
from ladd_ds.core.lock import LOCK_FILE

OUTPUT_MARKER = ".ladd_ds_output"

# kind -> a file that an output of that kind written by an earlier version always holds
LEGACY_FILES = {
    "export": ("ladd_export.json", "ladd_dpo.json"),
    "teacher": ("ladd_model.json",),
    "dataset": ("generation.state",),
    "run": ("config.yaml",),
    "demo": ("eval.json",),
}

DESCRIPTIONS = {
    "export": "an export (ladd-ds export)",
    "teacher": "a teacher folder (ladd-ds pretrain-teacher)",
    "dataset": "a dataset (ladd-ds synth, encode or pairs)",
    "run": "a run directory (ladd-ds train or dpo)",
    "demo": "a demo output (ladd-ds demo)",
    "classifier": "the demo's classifier",
    "evaluation": "an evaluation (ladd-ds evaluate)",
}


def absolute(path: str | Path) -> Path:
    """`path` made absolute without following links: `export --out .` names the current folder
    (its Path has no name to build a sibling temporary from)."""
    return Path(os.path.abspath(path))


def read_marker(folder: str | Path) -> dict | None:
    """The marker of `folder` ({"kind", "source", ...}), a legacy output's equivalent, or None."""
    folder = Path(folder)
    try:
        return json.loads((folder / OUTPUT_MARKER).read_text())
    except FileNotFoundError:
        pass
    except (ValueError, OSError):
        return None
    for kind, files in LEGACY_FILES.items():
        if any((folder / f).is_file() for f in files):
            return {"kind": kind, "source": None, "legacy": True}
    return None


def write_marker(folder: str | Path, kind: str, *, source: str | None = None) -> None:
    """Mark `folder` as an output of `kind` made from `source` (a run directory, a model, a
    config: what tells one output of this kind from another)."""
    record = {"kind": kind, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps(record))


def _contents(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output(
    out: str | Path, kind: str, *, source: str | None = None, overwrite: bool = False, option: str = "--out"
) -> bool:
    """Refuse to write output `kind` at `out` unless it is free or ours (module docstring).
    Returns True when `out` holds an output of `kind` that will be replaced or continued."""
    out = absolute(out)
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise OutputExistsError(
            f"{option} {out}: a file is there; ladd-ds writes a folder there and never replaces a file. Pass another {option}"
        )
    if not any(p.name != LOCK_FILE for p in out.iterdir()):
        return False  # empty, or only the lock of a job that is claiming it (the lock then decides)
    marker = read_marker(out)
    what = DESCRIPTIONS.get(kind, kind)
    if marker is None:
        raise OutputExistsError(
            f"{option} {out}: the folder holds files ladd-ds did not write ({_contents(out)}); "
            f"it would be replaced by {what}. Pass a new or empty folder"
        )
    if marker.get("kind") != kind:
        found = DESCRIPTIONS.get(marker.get("kind"), str(marker.get("kind")))
        raise OutputExistsError(f"{option} {out}: it holds {found}, not {what}; it is left alone. Pass another {option}")
    same = marker.get("source") is None or source is None or marker.get("source") == source
    if not same and not overwrite:
        raise OutputExistsError(
            f"{option} {out}: it holds {what} of {marker.get('source')}, not of {source}; "
            f"pass --overwrite to replace it, or another {option}"
        )
    return True
