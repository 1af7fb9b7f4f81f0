"""Resumable training state: RUN_DIR/checkpoints/step-XXXXXXXX/.

Layout: one DeepSpeed checkpoint per trainable engine (`student/`, `heads/`), one
`rank-XXXXX.pt` per rank (EMA shard, data-loader state: plain tensors and numbers, never config
objects or code), and `trainer_state.json`. Every rank writes into a hidden temporary directory;
after a barrier rank 0 renames it into place, so a directory named step-XXXXXXXX is always
complete and a crash mid-write leaves only a hidden `.step-XXXXXXXX.tmp` directory that is never picked up.
Assumes RUN_DIR is on a file system every rank sees (as DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ladd_ds.core.files import commit_directory, temporary_sibling
from ladd_ds.distributed import faults
from ladd_ds.distributed.ranks import barrier, is_main, rank

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


def save_checkpoint(run_dir: Path, step: int, engines: dict, rank_state: dict, trainer_state: dict, keep_last: int) -> Path:
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
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
    torch.save(rank_state, tmp / f"rank-{rank():05d}.pt")
    faults.maybe_die("kill_in_save", step)
    barrier()
    if is_main():
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        commit_directory(tmp, final)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def read_rank_states(path: Path) -> list[dict]:
    """Every rank's rank-XXXXX.pt of a checkpoint, in rank order."""
    files = sorted(path.glob("rank-*.pt"))
    expected = read_trainer_state(path)["world_size"]
    if len(files) != expected:
        raise RuntimeError(f"checkpoint {path} has {len(files)} rank files, expected {expected}")
    return [torch.load(f, weights_only=True) for f in files]


UNIVERSAL_DIR = "universal"


def prepare_universal(path: Path, names: list[str]) -> Path:
    """Collective: convert the engines' ZeRO checkpoints in `path` to DeepSpeed's universal format
    (path/universal/<name>/), which loads on any world size. Converted once, atomically."""
    target = path / UNIVERSAL_DIR
    if is_main() and not target.is_dir():
        tmp = temporary_sibling(target, unique=False)
        for name in names:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
            cmd += ["--input_folder", str(path / name), "--output_folder", str(tmp / name)]
            # ZeRO-1/2 checkpoints lack the universal-info block that Megatron-style clients add;
            # for plain (no tensor/pipeline parallel) models the default block is correct.
            cmd += ["--inject_missing_state"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {path / name} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        commit_directory(tmp, target)
    barrier()
    return target


def load_checkpoint(path: Path, engines: dict, universal: bool = False) -> tuple[dict, list[dict]]:
    """Collective: restores the engines (weights, optimizer, LR schedule); returns
    (trainer_state, every rank's saved state). `universal`: load the converted universal
    checkpoint (world size changed; the engines were built with checkpoint.load_universal)."""
    source = path / UNIVERSAL_DIR if universal else path
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(source), tag=name)
        if load_path is None:
            raise RuntimeError(f"checkpoint {path}: could not load the '{name}' engine state from {source / name}")
    return read_trainer_state(path), read_rank_states(path)
