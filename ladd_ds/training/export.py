"""What every exporter shares: finding a run's checkpoint, consolidating ZeRO shards into full
state dicts, EMA weights, and building a diffusers transformer around a state dict. The LADD
student's export is ladd_ds.ladd.export, the DPO model's ladd_ds.dpo.export; `ladd-ds export`
picks one by the checkpoint's trainer kind."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from ladd_ds.config import Config, load_config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.distributed.engines import consolidate_zero_checkpoint
from ladd_ds.models.registry import resolve_model_config, transformer_from_config
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.ema import gather_full_shadow

STUDENT_PREFIX = "transformer."  # FlowModel wraps the diffusers transformer as `.transformer`


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = dict(ckpt.complete_checkpoints(run_dir))
    if not found:
        raise MissingInputError(f"{run_dir} has no complete checkpoint under checkpoints/ (train first, or check --run)")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise MissingInputError(f"{run_dir}: no complete checkpoint for step {step} (available: {sorted(found)})")
    return found[step]


def gather_ema(checkpoint: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every trained parameter replaced by its EMA from the shards in rank-XXXXX.pt."""
    states = ckpt.read_rank_states(checkpoint)
    if any("ema" not in s for s in states):
        raise InputError(f"{checkpoint} holds no EMA (the run had optim.ema_decay = 0); export without --ema")
    shadows = [s["ema"]["shadow"] for s in states]
    out = dict(state)  # buffers (e.g. the positional embedding) have no EMA
    out.update(gather_full_shadow(shadows, {k: v.shape for k, v in state.items()}))
    return out


def absolute_spec(spec: str) -> str:
    """A model/codec spec as an absolute path when it names a folder, so the export can be used
    from anywhere."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def build_transformer_from_state(spec: str, state: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    """An SD3 transformer of `spec`'s architecture holding `state` (no weights are initialized)."""
    model = transformer_from_config(resolve_model_config(spec), meta=True)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def run_checkpoint(run_dir: Path, step: int | None) -> tuple[Config, Path, str]:
    """(config, checkpoint, trainer kind) of a run directory: what every exporter starts from."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise MissingInputError(f"{run_dir} has no config.yaml: is it a ladd-ds run directory?")
    checkpoint = find_checkpoint(run_dir, step)
    return load_config(config_file), checkpoint, ckpt.read_trainer_state(checkpoint).get("trainer", "ladd")


def checkpoint_info(run_dir: Path, checkpoint: Path) -> dict:
    """Where an export came from, for its JSON record."""
    return {"run_dir": str(run_dir), "checkpoint": checkpoint.name, "step": int(checkpoint.name.split("-")[1])}


def consolidated_transformer(checkpoint: Path, engine: str) -> dict[str, torch.Tensor]:
    """The full state dict of the FlowModel trained by `engine`, without its `transformer.` prefix."""
    state = consolidate_zero_checkpoint(checkpoint, engine)
    return {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
