"""A run directory belongs to one run of one method, written by one job at a time.

`claim_run_dir` (collective, at the start of `ladd-ds train` / `dpo`):
- refuses a --run-dir that is a file, a folder of files ladd-ds did not write, an output of
  another kind (an export, a dataset, ...) or a run of the other method (a DPO run directory given
  to `ladd-ds train`), each with one line saying what is there;
- takes RUN_DIR/LOCK_FILE (ladd_ds.core.lock), so a second job started on the same run directory
  is refused with the holder's host, pid and start time, and marks the folder as a run directory.
Rank 0 does the checks and holds the lock (the run directory is on a file system every rank sees,
as checkpoints require); every rank raises the same error.

`record_config` (rank 0, once the step to resume from is known): config.yaml keeps the config the
run started with; a resumed run whose config changes what is trained is refused unless
`--allow-change` names the keys; config_history.jsonl records every start (step, world size,
accepted changes), and `effective_overrides` replays them for exports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ladd_ds.config import Config, config_to_dict, load_config, save_config
from ladd_ds.core.errors import InputError, OutputExistsError
from ladd_ds.core.lock import LOCK_FILE, FileLock
from ladd_ds.core.outputs import DESCRIPTIONS, read_marker
from ladd_ds.distributed.claim import claim_folder
from ladd_ds.training import checkpoint as ckpt

COMMANDS = {"ladd": "ladd-ds train (LADD)", "dpo": "ladd-ds dpo (Diffusion-DPO)"}


def recorded_method(run_dir: Path) -> str | None:
    """The method a run directory belongs to: its marker's, or (written before the marker) its
    newest checkpoint's trainer kind; None when nothing says."""
    marker = read_marker(run_dir) or {}
    if marker.get("kind") == "run" and marker.get("source"):
        return marker["source"]
    latest = ckpt.latest_checkpoint(run_dir)
    return ckpt.read_trainer_state(latest).get("trainer") if latest is not None else None


def check_run_dir(run_dir: Path, method: str) -> None:
    """Raise OutputExistsError unless `run_dir` is free or a run directory of `method`."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise OutputExistsError(f"--run-dir {run_dir}: a file is there, not a run directory; pass another --run-dir")
    if not any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        return
    marker = read_marker(run_dir)
    if marker is None:
        raise OutputExistsError(
            f"--run-dir {run_dir}: the folder holds files that are not a ladd-ds run ("
            f"{', '.join(sorted(p.name for p in run_dir.iterdir())[:3])}); pass a new or empty folder"
        )
    if marker.get("kind") != "run":
        found = DESCRIPTIONS.get(marker.get("kind"), str(marker.get("kind")))
        raise OutputExistsError(f"--run-dir {run_dir}: it holds {found}, not a run directory; pass another --run-dir")
    recorded = recorded_method(run_dir)
    if recorded is not None and recorded != method:
        raise OutputExistsError(
            f"--run-dir {run_dir} is a run directory of {COMMANDS.get(recorded, recorded)}; "
            f"{COMMANDS.get(method, method)} cannot continue it: pass another --run-dir"
        )


def claim_run_dir(run_dir: str | Path, method: str) -> FileLock | None:
    """Collective: check `run_dir` for `method`, create it, take its lock and mark it (rank 0);
    returns the held lock on rank 0, None elsewhere."""
    return claim_folder(run_dir, lambda d: check_run_dir(d, method), kind="run", source=method, what="run directory")


# ---------------------------------------------------------------------------------------------
# The recorded config: config.yaml as the run started, config_history.jsonl for every later start

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
# Keys a resumed run may change freely: they change how long, how visibly or how robustly it runs,
# or how it reads its data, not what is trained. Prefixes end with a dot.
FREE_KEYS = (
    "run.max_steps",
    "run.run_dir",
    "model.gradient_checkpointing",  # recompute instead of storing: the same math, less memory
    "model.compile",  # the same blocks compiled: the same math within round-off
    "model.attention_backend",  # another kernel for the same attention: the same math within round-off
    "logging.",
    "checkpoint.",
    "health.",
    "deepspeed.device_memory_gib",
    "deepspeed.dist_backend",
    "deepspeed.z3_leaf_blocks",  # how ZeRO-3 gathers the same weights: the same math
    "data.num_workers",
    "data.cache_dir",
    "data.shared_memory_cleanup",
    "data.compression",  # how synth / encode / pairs write shards; and the image filters of encode:
    "data.min_image_side",
    "data.max_aspect_ratio",
    "synth.",  # the sections of other commands: not read by training
    "pairs.",
)


BATCH_KEYS = ("data.micro_batch_size", "optim.grad_accum")


def global_batch(flat: dict, world: int) -> int:
    return int(flat["data.micro_batch_size"]) * int(flat["optim.grad_accum"]) * world


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _matches(key: str, names) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) or key.startswith(n + ".") for n in names)


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def effective_overrides(run_dir: Path) -> list[str]:
    """`--set` overrides that turn config.yaml into the config the run last trained with (every
    change its history records, in order), for load_config."""
    latest: dict = {}
    for entry in read_history(run_dir):
        latest.update({k: new for k, (_, new) in entry.get("changed", {}).items()})
    return [f"{k}={json.dumps(v)}" for k, v in latest.items()]


def record_config(run_dir: Path, cfg: Config, *, step: int, world: int, saved_world: int, allow_change: list[str] | None) -> None:
    """Rank 0, before any engine is built. A new run writes config.yaml. A run that resumes
    (`step` > 0) compares `cfg` with the config it last trained with: keys that change what is
    trained are refused with the list of differences unless `allow_change` names them (a key or
    a section); the accepted changes, the step and the world size are appended to
    config_history.jsonl, and config.yaml keeps the config the run started with. `world`: this
    start's world size, `saved_world`: the one that wrote the checkpoint it resumes from."""
    run_dir = Path(run_dir)
    new = flatten(config_to_dict(cfg))
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world, "changed": {}}
    if step == 0 or not (run_dir / CONFIG_FILE).is_file():
        save_config(cfg, run_dir / CONFIG_FILE)  # nothing trained yet: this is the run's config
    else:
        old = flatten(config_to_dict(load_config(run_dir / CONFIG_FILE, effective_overrides(run_dir))))
        changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        refused = {k: v for k, v in changed.items() if not _matches(k, FREE_KEYS) and not _matches(k, allow_change or [])}
        # The world size may change (the checkpoint is converted): then the per-rank batch changes
        # with it, and what must stay is the global batch (the data position resumes exactly only
        # with the same global batch: docs/training.md, "Training runs", resume on another world size).
        old_world = saved_world
        old_batch, new_batch = global_batch(old, old_world), global_batch(new, world)
        allowed_batch = any(_matches(k, allow_change or []) for k in BATCH_KEYS)
        for key in BATCH_KEYS:
            refused.pop(key, None)
        if old_batch != new_batch and not allowed_batch:
            key = "data.micro_batch_size"
            refused[key] = [
                f"{old[key]} (global batch {old_batch} on {old_world} ranks)",
                f"{new[key]} (global batch {new_batch} on {world} ranks)",
            ]
        if refused:
            lines = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in refused.items())
            raise InputError(
                f"--run-dir {run_dir} resumes at step {step}, but the config changes what is trained: {lines}. "
                f"Restore those values, pass --allow-change {','.join(refused)} to train on with them "
                "(recorded in config_history.jsonl), or pass a new --run-dir"
            )
        entry["changed"] = changed
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
