"""Building a LADD run: teacher, student and discriminator heads, their DeepSpeed configs, and
the --dry-run report."""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.models.activations import model_activation_bytes
from ladd_ds.models.flow_model import FlowModel, build_flow_model
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.training.build import (
    DryRunReport,
    EngineSlot,
    check_compile_stages,
    check_data_matches_model,
    dry_run_data_lines,
    place_engines,
    placement_problems,
    placement_report,
    planned_shapes,
    training_dtype,
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
    cfg: Config, device: str | None = None, ds_configs: dict[str, dict] | None = None
) -> tuple[FlowModel, FlowModel, DiscriminatorHeads, list[int]]:
    """Teacher, student and heads. The student starts as a copy of the teacher (built again from
    the same preset seed or folder, which also works when both are partitioned under ZeRO-3)
    unless model.student names its own. With `ds_configs` (for engines), teacher and student are
    built in the training precision, partitioned under ZeRO-3 and on this rank's device otherwise;
    without, in fp32 on the host (or `device`). With model.compile, the blocks of teacher and
    student are compiled (not on the meta device)."""
    dtype = training_dtype(cfg) if ds_configs else torch.float32
    ds_configs = ds_configs or {}
    check_compile_stages(cfg, {"student_stage": ds_configs.get("student"), "teacher_stage": ds_configs.get("teacher")})
    task = cfg.ladd.task
    teacher = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("teacher"), dtype, task)
    if cfg.model.student is None:
        student = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("student"), dtype, task)
    else:
        student = build_flow_model(cfg.model.student, cfg.run.seed + 1, device, ds_configs.get("student"), dtype, task)
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


ENGINES = [
    EngineSlot("student", "student_config", "student_stage", trainable=True, keeps_ema=True),
    EngineSlot("heads", "heads_config", "heads_stage", trainable=True),
    EngineSlot("teacher", "teacher_config", "teacher_stage", trainable=False),
]


def step_activations(cfg: Config, models: dict) -> tuple[float, str]:
    """Bytes autograd holds at the peak of a LADD step (the generator step: the student's forward,
    then the teacher's on the re-noised fakes, which the gradient flows back through), and a note
    on the shapes assumed."""
    teacher, student = models["teacher"], models["student"]
    h, w, text, note = planned_shapes(cfg, teacher.transformer.config)
    dtype = training_dtype(cfg)
    args = (cfg.data.micro_batch_size, (h, w), text, dtype, cfg.model.gradient_checkpointing)
    taps = resolve_taps(cfg.discriminator.taps, teacher.num_blocks)
    teacher_blocks = teacher.num_blocks if cfg.ladd.distill_weight > 0 else max(taps) + 1
    total = model_activation_bytes(student, *args) + model_activation_bytes(teacher, *args, blocks_run=teacher_blocks)
    checkpointing = "on" if cfg.model.gradient_checkpointing else "off"
    return total, f"batch {cfg.data.micro_batch_size}, {note}, checkpointing {checkpointing}"


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return place_ladd_engines(cfg, world)[0]


def place_ladd_engines(cfg: Config, world: int, plan_always: bool = False):
    """(DeepSpeed config per engine, the memory plan or None): see training.build.place_engines."""

    def meta_models():
        teacher, student, heads, _ = build_models(cfg, device="meta")
        return {"teacher": teacher, "student": student, "heads": heads}

    return place_engines(cfg, world, ENGINES, meta_models, lambda models: step_activations(cfg, models)[0], plan_always)


def dry_run(cfg: Config, world: int) -> DryRunReport:
    """Validate, build the models on the meta device, count parameters, plan memory; no engines.
    The report's problems: unusable data, a plan that does not fit."""
    check_data_matches_model(cfg)
    configs, placement = place_ladd_engines(cfg, world, plan_always=True)
    check_compile_stages(cfg, {"student_stage": configs["student"], "teacher_stage": configs["teacher"]})
    teacher, student, heads, taps = build_models(cfg, device="meta")
    _, note = step_activations(cfg, {"teacher": teacher, "student": student})
    lines = [f"taps: {taps} ({len(taps)} heads); precision {cfg.deepspeed.precision}; world size {world}"]
    data_lines, problems = dry_run_data_lines(cfg, world, TASK_LAYOUTS[cfg.ladd.task])
    lines += [*data_lines, ""]
    lines += placement_report(cfg, placement, note)
    return DryRunReport("\n".join(lines), problems + placement_problems(placement))
