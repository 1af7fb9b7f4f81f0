"""Building a LADD run: teacher, student and discriminator heads, their DeepSpeed configs, and
the --dry-run report."""

from __future__ import annotations

import contextlib
import types

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.models.activations import RecomputeFlops, SavedTensors, fused_attention, recompute_bytes
from ladd_ds.models.conditioning import latent_channels
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
from ladd_ds.training.placement import StepActivations


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
    teacher.set_checkpointing(cfg.model.checkpoint_every("teacher"))
    student.set_checkpointing(cfg.model.checkpoint_every("student"))
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


class _MetaEngine:
    """What the steps call on an engine, for a model on the meta device: its forward and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def meta_step(cfg: Config, models: dict):
    """The method's steps on the meta models (teacher frozen, all in the training precision) and a
    meta micro-batch and noise of the planned shapes: (steps, batch, noise, shapes note)."""
    from ladd_ds.ladd.conditioned import ConditionedLADDSteps  # the steps import this module's layer
    from ladd_ds.ladd.steps import LADDSteps, Noise

    teacher, student, heads = models["teacher"], models["student"], models["heads"]
    dtype = training_dtype(cfg)
    for model in (teacher, student, heads):
        model.to(dtype)
    teacher.requires_grad_(False)  # as the engines freeze it (distributed.engines.build_engines)
    tc = teacher.transformer.config
    h, w, text, note = planned_shapes(cfg, tc)
    b, ch = cfg.data.micro_batch_size, latent_channels(tc)

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    batch = {
        "latent": meta(b, ch, h, w),  # (B, C, H, W)
        "prompt_embeds": meta(b, text, tc.joint_attention_dim),  # (B, L, D)
        "pooled": meta(b, tc.pooled_projection_dim),  # (B, P)
    }
    if cfg.ladd.task != "t2i":
        batch["condition"] = meta(b, ch, h, w)
    if cfg.ladd.task == "inpaint":
        batch["mask"] = meta(b, 1, h, w)
    t = [meta(b, dtype=torch.float32) for _ in range(3)]  # fp32 timesteps, as draw_noise makes them
    noise = Noise(t[0], meta(b, ch, h, w), t[1], meta(b, ch, h, w), t[2], meta(b, ch, h, w))
    engines = types.SimpleNamespace(student=_MetaEngine(student), teacher=_MetaEngine(teacher), heads=_MetaEngine(heads))
    variant = LADDSteps if cfg.ladd.task == "t2i" else ConditionedLADDSteps
    # No guided distillation target (distill_cfg 1): its extra teacher passes run without
    # gradients and keep nothing for backward, and the empty prompt's conditioning is data.
    steps = variant(cfg, engines, resolve_taps(cfg.discriminator.taps, teacher.num_blocks), torch.device("meta"))
    return steps, batch, noise, note


def step_activations(cfg: Config, models: dict, flops: bool = False) -> StepActivations:
    """What a LADD step keeps for backward, counted by running its own step code on the meta
    models: the generator step (the student's forward, the frozen teacher's on the re-noised
    fakes, which the gradient flows back through, the frozen heads) and the discriminator step
    (the trainable heads on the teacher's features of reals and fakes, and R1's second pass),
    each with the largest checkpointed block's recompute; with `flops`, the FLOPs that recompute
    adds (a forward and backward on meta tensors: seconds at 8B, so for --dry-run only)."""
    steps, batch, noise, note = meta_step(cfg, models)
    teacher, student, heads = models["teacher"], models["student"], models["heads"]
    owners = {"student": student, "teacher": teacher, "heads": heads}
    kept = {}
    # One pass serves both counts: the backwards (FLOPs only) save nothing the counter sees.
    with RecomputeFlops() if flops else contextlib.nullcontext() as counted:
        with fused_attention(), SavedTensors(owners) as saved:
            loss, _, fakes = steps.generator_loss(batch, noise)
            kept["G step"] = {name: saved.by_owner.get(name, 0) for name in (*owners, "other")}
        if flops:
            loss.backward()
        with fused_attention(), SavedTensors(owners) as saved:
            loss = steps.discriminator_loss(batch, noise, fakes if cfg.ladd.reuse_fakes else None)[0]
            kept["D step"] = {name: saved.by_owner.get(name, 0) for name in (*owners, "other")}
        if flops:
            loss.backward()
            for model in (student, heads):
                model.zero_grad(set_to_none=True)
    # The teacher runs without gradients in the D step: only the G step recomputes blocks.
    shapes = {
        "batch": cfg.data.micro_batch_size,
        "latent_hw": tuple(batch["latent"].shape[-2:]),
        "text_tokens": batch["prompt_embeds"].shape[1],
        "dtype": training_dtype(cfg),
    }
    recompute = {"G step": max(recompute_bytes(m, **shapes) for m in (student, teacher))}
    relative = counted.relative if flops else 0.0
    policy = f"checkpointing: student {checkpoint_name(student)}, teacher {checkpoint_name(teacher)}"
    return StepActivations(
        kept=kept,
        recompute=recompute,
        recompute_flops=relative,
        note=f"batch {cfg.data.micro_batch_size}, {note}, {policy}",
    )


def checkpoint_name(model: FlowModel) -> str:
    every = model.checkpoint_stride
    return {0: "none", 1: "all"}.get(every, f"every:{every}")


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return place_ladd_engines(cfg, world)[0]


def place_ladd_engines(cfg: Config, world: int, plan_always: bool = False, flops: bool = False):
    """(DeepSpeed config per engine, the memory plan or None): see training.build.place_engines."""

    def meta_models():
        teacher, student, heads, _ = build_models(cfg, device="meta")
        return {"teacher": teacher, "student": student, "heads": heads}

    def activations(models):
        # A pure function of these sections (not of the world size or the DeepSpeed templates),
        # and seconds at 8B (meta ops dispatch in Python): counted once per process.
        key = repr((cfg.model, cfg.discriminator, cfg.ladd, cfg.data, cfg.text, cfg.deepspeed.precision, flops))
        if key not in _STEP_ACTIVATIONS:
            _STEP_ACTIVATIONS[key] = step_activations(cfg, models, flops=flops)
        return _STEP_ACTIVATIONS[key]

    return place_engines(cfg, world, ENGINES, meta_models, activations, plan_always)


_STEP_ACTIVATIONS: dict[str, StepActivations] = {}


def dry_run(cfg: Config, world: int) -> DryRunReport:
    """Validate, build the models on the meta device, count parameters, plan memory; no engines.
    The report's problems: unusable data, a plan that does not fit."""
    check_data_matches_model(cfg)
    configs, placement = place_ladd_engines(cfg, world, plan_always=True, flops=True)
    check_compile_stages(cfg, {"student_stage": configs["student"], "teacher_stage": configs["teacher"]})
    taps = build_models(cfg, device="meta")[3]
    lines = [f"taps: {taps} ({len(taps)} heads); precision {cfg.deepspeed.precision}; world size {world}"]
    data_lines, problems = dry_run_data_lines(cfg, world, TASK_LAYOUTS[cfg.ladd.task])
    lines += [*data_lines, ""]
    lines += placement_report(cfg, placement)
    return DryRunReport("\n".join(lines), problems + placement_problems(placement))
