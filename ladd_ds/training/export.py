"""What every exporter shares: finding a run's checkpoint, the trained transformer's tensors
gathered from the ZeRO partitions one at a time (and their EMA), and writing them as a diffusers
folder in sharded safetensors (ladd_ds.models.sharded). The LADD student's export is
ladd_ds.ladd.export, the DPO model's ladd_ds.dpo.export; `ladd-ds export` picks one by the
checkpoint's trainer kind.

A tensor source is a callable producing one full fp32 tensor: nothing holds the whole model, so
an export's host memory is one output shard plus what consolidation holds (docs/training.md,
"Export memory")."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ladd_ds.config import Config, load_config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.outputs import absolute
from ladd_ds.distributed.engines import lazy_zero_checkpoint
from ladd_ds.models.registry import transformer_from_config
from ladd_ds.models.sharded import TensorSource, save_sharded_transformer
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.ema import read_ema_range
from ladd_ds.training.run_dir import effective_overrides

STUDENT_PREFIX = "transformer."  # FlowModel wraps the diffusers transformer as `.transformer`


def export_source(run_dir: str | Path) -> str:
    """What an export records as its source (ladd_ds.core.outputs): the run directory, absolute."""
    return str(absolute(run_dir))


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = dict(ckpt.complete_checkpoints(run_dir))
    if not found:
        raise MissingInputError(f"--run {run_dir} has no complete checkpoint under checkpoints/ (train first, or check --run)")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise MissingInputError(
            f"--step {step}: {run_dir} has no complete checkpoint for that step; pass one of {sorted(found)}, or leave "
            "--step out for the latest"
        )
    return found[step]


def ema_sources(checkpoint: Path, sources: dict[str, TensorSource], config: dict) -> dict[str, TensorSource]:
    """`sources` with every trained parameter replaced by its EMA, gathered per tensor from the
    shards in the (memory-mapped) rank-XXXXX.pt files; the transformer `config` gives the
    tensors' shapes."""
    states = ckpt.read_rank_states(checkpoint)
    if any("ema" not in s for s in states):
        raise InputError(f"{checkpoint} holds no EMA (the run had optim.ema_decay = 0); export without --ema")
    emas = [s["ema"] for s in states]
    shapes = transformer_from_config(config, meta=True).state_dict()
    out = dict(sources)  # buffers (e.g. the positional embedding) have no EMA
    for name in emas[0]["shadow"]:
        if name.startswith(STUDENT_PREFIX):
            short = name[len(STUDENT_PREFIX) :]
            out[short] = functools.partial(_full_shadow, emas, name, shapes[short].shape)
    return out


def _full_shadow(emas: list[dict], name: str, shape: torch.Size) -> torch.Tensor:
    """One parameter's whole EMA from the ranks' pieces; only this parameter's slices of the
    memory-mapped rank files are read."""
    numel = math.prod(shape)
    return read_ema_range(emas, name, numel=numel, start=0, stop=numel).view(shape).clone()


def absolute_spec(spec: str) -> str:
    """A model/codec spec as an absolute path when it names a folder, so the export can be used
    from anywhere."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def run_checkpoint(run_dir: Path, step: int | None) -> tuple[Config, Path, str]:
    """(config, checkpoint, trainer kind) of a run directory: what every exporter starts from."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise MissingInputError(
            f"--run {run_dir} has no config.yaml: pass the run directory of a `ladd-ds train` or `ladd-ds dpo` run"
        )
    checkpoint = find_checkpoint(run_dir, step)
    cfg = load_config(config_file, effective_overrides(run_dir))  # with the changes a resume accepted
    return cfg, checkpoint, ckpt.read_trainer_state(checkpoint).get("trainer", "ladd")


def checkpoint_info(run_dir: Path, checkpoint: Path) -> dict:
    """Where an export came from, for its JSON record."""
    return {"run_dir": str(run_dir), "checkpoint": checkpoint.name, "step": int(checkpoint.name.split("-")[1])}


def transformer_sources(checkpoint: Path, engine: str) -> dict[str, TensorSource]:
    """The tensors of the FlowModel trained by `engine`, without its `transformer.` prefix, each
    gathered from the ZeRO checkpoint when asked for."""
    lazy = lazy_zero_checkpoint(checkpoint, engine)
    return {k[len(STUDENT_PREFIX) :]: v.contiguous for k, v in lazy.items() if k.startswith(STUDENT_PREFIX)}


def write_transformer(folder: Path, config: dict, sources: dict[str, TensorSource], dtype: torch.dtype, shard_size: int) -> None:
    """`folder` (a diffusers transformer/ folder) holding `sources` in `dtype` for the transformer
    `config`, in safetensors shards of at most `shard_size` bytes."""
    save_sharded_transformer(folder, config, sources, dtype, shard_size, desc=f"writing {folder.name}/")
