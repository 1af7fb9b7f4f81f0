"""Diffusion-DPO's DeepSpeed engines: the trained model (with its optimizer) and, in full mode,
a frozen reference without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ladd_ds.distributed import engines as ds


@dataclass
class DPOEngines:
    model: Any  # DeepSpeedEngine with optimizer (LoRA mode: only the adapters are trainable)
    reference: Any | None  # frozen DeepSpeedEngine (full mode); None with LoRA (adapters off)
    ds_configs: dict[str, dict]


def build_dpo_engines(
    model: nn.Module, reference: nn.Module | None, ds_configs: dict[str, dict], *, lr: float, optim_cfg
) -> DPOEngines:
    """`reference`: the frozen copy of full mode, or None (LoRA mode: the model with its adapters off)."""
    # No optimizer: the reference only needs ZeRO's parameter partitioning and gathering.
    reference_engine = None if reference is None else ds.frozen_engine(reference, ds_configs["reference"])
    engine = ds.trainable_engine(model, ds_configs["model"], lr, optim_cfg)
    return DPOEngines(model=engine, reference=reference_engine, ds_configs=ds_configs)
