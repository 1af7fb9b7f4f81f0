"""Building a LADD run: teacher, student and discriminator heads, their DeepSpeed configs, and
the --dry-run report."""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.distributed import engines as ds
from ladd_ds.models.flow_model import FlowModel, build_flow_model
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.models.registry import count_parameters
from ladd_ds.training.build import (
    check_compile_stages,
    check_data_matches_model,
    dry_run_data_lines,
    engine_ds_config,
    memory_plan,
)


def resolve_taps(taps: list[int] | None, num_blocks: int) -> list[int]:
    if taps is None:
        return list(range(num_blocks))
    bad = [i for i in taps if i >= num_blocks]
    if bad:
        raise InputError(
            f"discriminator.taps: blocks {bad} do not exist (the teacher has {num_blocks} blocks, 0..{num_blocks - 1})"
        )
    return sorted(taps)


def build_models(
    cfg: Config, device: str = "cpu", ds_configs: dict[str, dict] | None = None
) -> tuple[FlowModel, FlowModel, DiscriminatorHeads, list[int]]:
    """Teacher, student and heads. The student starts as a copy of the teacher (built again from
    the same preset seed or folder, which also works when both are partitioned under ZeRO-3)
    unless model.student names its own. With `ds_configs`, ZeRO-3 models are built partitioned.
    With model.compile, the blocks of teacher and student are compiled (not on the meta device)."""
    ds_configs = ds_configs or {}
    check_compile_stages(cfg, {"student_config": ds_configs.get("student"), "teacher_config": ds_configs.get("teacher")})
    teacher = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("teacher"))
    if cfg.model.student is None:
        student = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("student"))
    else:
        student = build_flow_model(cfg.model.student, cfg.run.seed + 1, device, ds_configs.get("student"))
    if cfg.model.gradient_checkpointing:
        teacher.transformer.enable_gradient_checkpointing()
        student.transformer.enable_gradient_checkpointing()
    if cfg.model.compile and device != "meta":
        teacher.compile_blocks()
        student.compile_blocks()
    taps = resolve_taps(cfg.discriminator.taps, teacher.num_blocks)
    with torch.device(device) if device == "meta" else torch.device("cpu"):
        torch.manual_seed(cfg.run.seed + 2)
        heads = DiscriminatorHeads(
            feature_dim=teacher.feature_dim,
            num_heads=len(taps),
            pooled_dim=teacher.transformer.config.pooled_projection_dim,
            hidden=cfg.discriminator.hidden_channels,
            num_layers=cfg.discriminator.num_layers,
        )
    return teacher, student, heads, taps


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return {
        "student": engine_ds_config(cfg, world, "student_config", trainable=True),
        "heads": engine_ds_config(cfg, world, "heads_config", trainable=True),
        "teacher": engine_ds_config(cfg, world, "teacher_config", trainable=False),
    }


def dry_run(cfg: Config, world: int) -> str:
    """Validate, build the models on the meta device, count parameters, plan memory; no engines."""
    check_data_matches_model(cfg)
    ds_configs = build_ds_configs(cfg, world)
    check_compile_stages(cfg, {"student_config": ds_configs["student"], "teacher_config": ds_configs["teacher"]})
    teacher, student, heads, taps = build_models(cfg, device="meta")
    gib = 2**30
    lines = [f"taps: {taps} ({len(taps)} heads); precision {cfg.deepspeed.precision}; world size {world}"]
    lines += dry_run_data_lines(cfg)
    lines.append("")
    lines.append(f"{'engine':<9}{'params':>15}{'ZeRO':>5}{'weights':>10}{'grads':>10}{'optim':>10}{'total GiB/rank':>16}")
    total = 0.0
    for name, model, trainable in (("teacher", teacher, False), ("student", student, True), ("heads", heads, True)):
        n = count_parameters(model)
        stage = ds.zero_stage(ds_configs[name])
        plan = memory_plan(n, trainable, cfg.deepspeed.precision, stage, world)
        engine_total = sum(plan.values())
        total += engine_total
        lines.append(
            f"{name:<9}{n:>15,}{stage:>5}{plan['weights'] / gib:>10.2f}{plan['grads'] / gib:>10.2f}"
            f"{plan['optimizer'] / gib:>10.2f}{engine_total / gib:>16.2f}"
        )
    lines.append(f"{'all':<9}{'':>15}{'':>5}{'':>10}{'':>10}{'':>10}{total / gib:>16.2f}")
    lines += [
        "",
        "per rank = params x bytes / ranks sharing them: weights 2 B (bf16) or 4 B (fp32); grads 4 B;",
        "Adam 8 B (+4 B fp32 master in bf16); ZeRO-1 shards optimizer, -2 also grads, -3 also weights.",
        "Activations, communication buffers and the CUDA context are not included.",
    ]
    return "\n".join(lines)
