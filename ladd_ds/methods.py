"""The method a run trains with, by command and config: it sits above both methods (ladd/, dpo/)
so that each of them stays independent of the other, as ladd_ds.export does for their exporters."""

from __future__ import annotations

from ladd_ds.config import Config
from ladd_ds.dpo.method import DPOMethod
from ladd_ds.ladd.method import ConditionedLADDMethod, LADDMethod
from ladd_ds.training.method import Method


def method_for(cfg: Config, command: str) -> type[Method]:
    """`ladd-ds train`: LADD, text-to-image (`LADDMethod`) or, for ladd.task inpaint and edit, the
    image-conditioned variant (`ConditionedLADDMethod`); `ladd-ds dpo`: Diffusion-DPO."""
    if command == "dpo":
        return DPOMethod
    if command == "train":
        return next(m for m in (LADDMethod, ConditionedLADDMethod) if cfg.ladd.task in m.tasks)
    raise ValueError(f"no training method for the command {command!r} (known: train, dpo)")
