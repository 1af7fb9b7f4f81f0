"""LADD's three DeepSpeed engines: the student and the discriminator heads, each with its
optimizer, and the frozen teacher without one (docs/method.md, section 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ladd_ds.distributed import engines as ds


@dataclass
class Engines:
    student: Any  # DeepSpeedEngine with optimizer
    heads: Any  # DeepSpeedEngine with optimizer
    teacher: Any  # DeepSpeedEngine without optimizer (frozen)
    ds_configs: dict[str, dict]


def build_engines(
    student: nn.Module, teacher: nn.Module, heads: nn.Module, ds_configs: dict[str, dict], optim_cfg, *, leaf_blocks: bool = False
) -> Engines:
    """`leaf_blocks`: deepspeed.z3_leaf_blocks (distributed/engines.py set_leaf_blocks) for the
    student and the teacher."""
    teacher.requires_grad_(False)
    teacher.eval()
    if leaf_blocks:
        ds.set_leaf_blocks(student, ds_configs["student"])
        ds.set_leaf_blocks(teacher, ds_configs["teacher"])
    student_engine = ds.trainable_engine(student, ds_configs["student"], optim_cfg.student_lr, optim_cfg)
    heads_engine = ds.trainable_engine(heads, ds_configs["heads"], optim_cfg.heads_lr, optim_cfg)
    # No optimizer: a frozen teacher only needs ZeRO's parameter partitioning and gathering.
    teacher_engine = ds.frozen_engine(teacher, ds_configs["teacher"])
    return Engines(student=student_engine, heads=heads_engine, teacher=teacher_engine, ds_configs=ds_configs)
