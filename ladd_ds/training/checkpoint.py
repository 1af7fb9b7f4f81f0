"""Resumable training state: RUN_DIR/checkpoints/step-XXXXXXXX/.

Layout: one DeepSpeed checkpoint per trainable engine (`student/`, `heads/`), one
`rank-XXXXX.pt` per rank (EMA shard, data-loader state: plain tensors and numbers, never config
objects or code), and `trainer_state.json`. Every rank writes into a hidden temporary directory;
after a barrier rank 0 renames it into place, so a directory named step-XXXXXXXX is always
complete and a crash mid-write leaves only a hidden `.step-XXXXXXXX.tmp` directory that is never picked up.
Assumes RUN_DIR is on a file system every rank sees (as DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch

from ladd_ds.core.errors import MissingInputError, NoSpaceError, reporting_full_disk
from ladd_ds.core.files import commit_directory, temporary_sibling
from ladd_ds.distributed import faults
from ladd_ds.distributed.ranks import barrier, first_of_ranks, is_main, rank

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_DIR.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, step: int, *, engines: dict, rank_state: dict, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank must call it with the same step."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    if (final / STATE_FILE).is_file():  # e.g. a resumed run that stops at the step it resumed from
        return final
    tmp = final.with_name(f".{final.name}.tmp")  # one name for all ranks
    if is_main():
        if final.exists():  # left by hand; never complete (no STATE_FILE)
            shutil.rmtree(final)
        temporary_sibling(final, unique=False)  # clears a crashed save's leftovers
    barrier()
    # A full disk is one clear line naming the checkpoint; its partial files are removed (the
    # earlier checkpoints are untouched: the run resumes from the newest once there is space).
    # The ranks agree on it before going on, so that every rank stops with that line instead of
    # waiting for the one that failed (a failure inside DeepSpeed's own collectives cannot be
    # agreed on this way: the other ranks wait there until health.collective_timeout_s).
    full = None
    try:
        with reporting_full_disk(final, "checkpoint"):
            for name, engine in engines.items():
                engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
            torch.save(rank_state, tmp / f"rank-{rank():05d}.pt")
            faults.maybe_die("enospc_in_save", step)
    except NoSpaceError as e:
        full = str(e)
    full = first_of_ranks(full)  # collective: the barrier before the commit
    if full is not None:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise NoSpaceError(full)
    faults.maybe_die("kill_in_save", step)
    barrier()
    if is_main():
        with _removed_on_error(tmp), reporting_full_disk(final, "checkpoint"):
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        commit_directory(tmp, final)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


@contextlib.contextmanager
def _removed_on_error(tmp: Path):
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def rank_file(path: Path, r: int) -> Path:
    return Path(path) / f"rank-{r:05d}.pt"


def saved_world_size(path: Path) -> int:
    """The world size that wrote checkpoint `path`, after checking that its rank files are all there."""
    expected = read_trainer_state(path)["world_size"]
    missing = [rank_file(path, r).name for r in range(expected) if not rank_file(path, r).is_file()]
    if missing:
        raise MissingInputError(
            f"checkpoint {path} was written by {expected} ranks but lacks {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}: it is incomplete; remove it to resume from the one before"
        )
    return expected


def checkpoint_bytes(path: Path, r: int) -> tuple[int, int]:
    """(bytes of the files rank `r` reads to resume on the world size that wrote `path`, bytes of
    every file of the checkpoint). A rank reads its ZeRO partition files (zero_pp_rank_<r>_...),
    its rank file and the files without a rank (a ZeRO-0 engine's one model file)."""
    share = total = 0
    for f in Path(path).rglob("*.pt"):
        if any(part.lstrip(".").startswith(UNIVERSAL_DIR) for part in f.relative_to(path).parts[:-1]):
            continue  # a conversion for another world size (training/convert.py)
        size = f.stat().st_size
        total += size
        ranked = re.match(r"^(?:zero_pp_rank_(\d+)_|rank-(\d+)\.pt$)", f.name)
        if ranked is None or int(ranked.group(1) or ranked.group(2)) == r:
            share += size
    return share, total


def read_rank_state(path: Path, r: int) -> dict:
    """Rank `r`'s rank-XXXXX.pt, memory-mapped: its tensors are read from disk as they are used."""
    return torch.load(rank_file(path, r), weights_only=True, mmap=True)


def read_rank_states(path: Path) -> list[dict]:
    """Every rank's rank-XXXXX.pt of a checkpoint, in rank order, memory-mapped (see read_rank_state)."""
    return [read_rank_state(path, r) for r in range(saved_world_size(path))]


UNIVERSAL_DIR = "universal"


def load_checkpoint(path: Path, engines: dict, universal: bool = False) -> dict:
    """Collective: restores the engines (weights, optimizer, LR schedule) and returns the trainer
    state; the rank files are read by the caller (read_rank_state), each rank only what it needs.
    `universal`: load the converted universal checkpoint (world size changed; the engines were
    built with checkpoint.load_universal)."""
    source = path / UNIVERSAL_DIR if universal else path
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(source), tag=name)
        if load_path is None:
            raise RuntimeError(f"checkpoint {path}: could not load the '{name}' engine state from {source / name}")
    return read_trainer_state(path)
