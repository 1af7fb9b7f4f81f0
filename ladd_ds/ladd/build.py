"""Building a LADD run: teacher, student and discriminator heads, their DeepSpeed configs, and
the --dry-run report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from collections.abc import Callable

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.distributed import engines as ds
from ladd_ds.ladd import validation
from ladd_ds.ladd.conditioned import ConditionedLADDSteps
from ladd_ds.ladd.steps import LADDSteps, Noise
from ladd_ds.models.activations import RecomputeFlops, SavedTensors, fused_attention, recompute_bytes
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.models.flow_model import FlowModel, build_flow_model
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.models.registry import check_teacher_task
from ladd_ds.training import comms_plan, zero3_replay
from ladd_ds.training.build import (
    DryRunReport,
    EngineSlot,
    check_compile_stages,
    check_data_matches_model,
    dry_run_data_lines,
    engine_ds_config,
    place_engines,
    placement_problems,
    placement_report,
    planned_shapes,
    resolve_sizes,
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


def check_task_teacher(cfg: Config) -> None:
    """Before anything is built: an inpainting or editing run (`ladd.task`) needs a teacher of the
    task; a text-to-image model.student is still widened (models/registry.check_teacher_task)."""
    if cfg.ladd.task != "t2i":
        check_teacher_task(cfg.model.teacher, cfg.ladd.task, needed_by=f"ladd.task={cfg.ladd.task}")


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
    teacher = build_flow_model(
        cfg.model.teacher, seed=cfg.run.seed, device=device, ds_config=ds_configs.get("teacher"), dtype=dtype, task=task
    )
    if cfg.model.student is None:
        student = build_flow_model(
            cfg.model.teacher, seed=cfg.run.seed, device=device, ds_config=ds_configs.get("student"), dtype=dtype, task=task
        )
    else:
        student = build_flow_model(
            cfg.model.student, seed=cfg.run.seed + 1, device=device, ds_config=ds_configs.get("student"), dtype=dtype, task=task
        )
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
    EngineSlot("student", "student_config", "student_stage", trainable=True, keeps_ema=True, leaf_blocks=True),
    EngineSlot("heads", "heads_config", "heads_stage", trainable=True),
    EngineSlot("teacher", "teacher_config", "teacher_stage", trainable=False, leaf_blocks=True),
]


class _MetaEngine:
    """What the steps call on an engine, for a model on the meta device: its forward and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def as_engines_hold(cfg: Config, models: dict) -> None:
    """The meta models as the engines hold theirs: in the training precision, the teacher frozen
    (ladd/engines.py build_engines)."""
    for model in models.values():
        model.to(training_dtype(cfg))
    models["teacher"].requires_grad_(False)


def meta_step(cfg: Config, models: dict):
    """The method's steps on the meta models (teacher frozen, all in the training precision) and a
    meta micro-batch and noise of the planned shapes: (steps, batch, noise, shapes note)."""

    teacher, student, heads = models["teacher"], models["student"], models["heads"]
    dtype = training_dtype(cfg)
    as_engines_hold(cfg, models)
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
    steps = variant(cfg, engines, taps=resolve_taps(cfg.discriminator.taps, teacher.num_blocks), device=torch.device("meta"))
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
        flops=float(counted.total) if flops else 0.0,
        note=f"batch {cfg.data.micro_batch_size}, {note}, {policy}",
    )


def checkpoint_name(model: FlowModel) -> str:
    every = model.checkpoint_stride
    return {0: "none", 1: "all"}.get(every, f"every:{every}")


def ladd_layouts(
    cfg: Config,
    configs: dict[str, dict],
    models: dict,
    *,
    flops: bool = True,
    engines: tuple[str, ...] = ("student", "teacher", "heads"),
) -> dict[str, zero3_replay.EngineLayout]:
    """Each model's module order and FLOPs for the communication plan: one forward of each on
    meta tensors of the planned shapes (the teacher frozen, its input requiring grad as the fakes
    do; the heads on the teacher's features). FLOPs only with deepspeed.interconnect: without
    one nothing is timed. `engines`: the layouts wanted (the heads' needs the teacher's forward
    for its inputs). A process traces each model once for everything its trace depends on
    (_traced_layout)."""
    teacher, student = models["teacher"], models["student"]
    taps = resolve_taps(cfg.discriminator.taps, teacher.num_blocks)
    tc = teacher.transformer.config
    h, w, text, _ = planned_shapes(cfg, tc)
    b = cfg.data.micro_batch_size
    dtype = next(student.parameters()).dtype  # the memory plan's models are in the training precision
    with torch.device("meta"):
        x = torch.randn(b, tc.in_channels, h, w, dtype=dtype)  # (B, C, H, W): the transformer's input (model_input)
        t = torch.rand(b)  # (B,)
        embeds = torch.randn(b, text, tc.joint_attention_dim, dtype=dtype)
        pooled = torch.randn(b, tc.pooled_projection_dim, dtype=dtype)
    checkpointed = {m: [m.blocks[i] for i in m.checkpointed_blocks] for m in (teacher, student)}
    full = cfg.ladd.distill_weight > 0
    # The traces run without checkpointing: the blocks are named by `checkpointed` instead, and on
    # the meta device torch's checkpoint wrapper only adds time (most of an 8B trace's, profiled).
    flags = {m: m.transformer.gradient_checkpointing for m in (teacher, student)}
    for m in flags:
        m.transformer.gradient_checkpointing = False
    # The teacher is traced frozen (the engines freeze it); frozen for the whole call so that its
    # part of the memo keys does not depend on whether the caller froze it already.
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _trace_ladd_models(cfg, configs, models, taps, (x, t, embeds, pooled), checkpointed, full, flops, engines)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, flag in flags.items():
            m.transformer.gradient_checkpointing = flag


def _trace_ladd_models(
    cfg, configs, models, taps, inputs, checkpointed, full, flops, engines
) -> dict[str, zero3_replay.EngineLayout]:
    teacher, student, heads = models["teacher"], models["student"], models["heads"]
    x, t, embeds, pooled = inputs
    timed = flops and cfg.deepspeed.interconnect is not None

    def threshold(name):
        return float(configs[name].get("zero_optimization", {}).get("stage3_param_persistence_threshold", 1e5))

    def leaves(name):  # deepspeed.z3_leaf_blocks: the blocks gather as one module under ZeRO-3
        leaf = cfg.deepspeed.z3_leaf_blocks and ds.zero_stage(configs[name]) >= 3
        return list(models[name].blocks) if leaf else []

    # What every trace here depends on besides its model and its engine's settings.
    shared = (repr((cfg.model, cfg.discriminator, cfg.ladd)), tuple(taps), full, *map(_tensor_key, inputs))

    def key(name, *traced_models):
        return (name, shared, *map(_model_key, traced_models), threshold(name), bool(leaves(name)))

    def trace_teacher():
        x_fake = x.detach().requires_grad_(True)
        return zero3_replay.trace_model(
            teacher,
            lambda m: m(x_fake, t, embeds, pooled, taps=taps, velocity=full),
            persistence_threshold=threshold("teacher"),
            checkpointed=checkpointed[teacher],
            leaves=leaves("teacher"),
            count_flops=timed,
        )

    out = {}
    if "student" in engines:
        out["student"] = _traced_layout(
            key("student", student),
            timed,
            lambda: zero3_replay.trace_model(
                student,
                lambda m: m(x, t, embeds, pooled),
                persistence_threshold=threshold("student"),
                checkpointed=checkpointed[student],
                leaves=leaves("student"),
                count_flops=timed,
            ),
        )[0]
    if "teacher" in engines or "heads" in engines:
        out["teacher"], features = _traced_layout(key("teacher", teacher), timed, trace_teacher)
        features = features[0] if full else features
    if "heads" in engines:
        out["heads"] = _traced_layout(
            key("heads", teacher, heads),  # the heads' inputs are the teacher's features
            timed,
            lambda: zero3_replay.trace_model(
                heads,
                lambda m: m(features, t, pooled),
                persistence_threshold=threshold("heads"),
                frozen_too=True,
                count_flops=timed,
            ),
        )[0]
    return {name: out[name] for name in engines}


# Meta traces, each seconds at 8B (meta ops dispatch in Python), keyed on everything the trace
# depends on (_trace_ladd_models): the dry run, the ZeRO-3 windows of every engine and the doc
# tables (evaluation/) ask for the same ones many times. Values: (layout, what the forward
# returned: the heads' inputs, for the teacher).
_LAYOUTS: dict[tuple, tuple[zero3_replay.EngineLayout, object]] = {}


def _traced_layout(key: tuple, timed: bool, trace: Callable[[], tuple]) -> tuple[zero3_replay.EngineLayout, object]:
    """`trace()` once per key and FLOP counting; a trace that counted FLOPs serves one that does
    not (its layout with `flops` 0, as an uncounted trace leaves it)."""
    if (key, timed) not in _LAYOUTS and not timed and (key, True) in _LAYOUTS:
        layout, result = _LAYOUTS[(key, True)]
        return dataclasses.replace(layout, flops=0.0), result
    if (key, timed) not in _LAYOUTS:
        _LAYOUTS[(key, timed)] = trace()
    return _LAYOUTS[(key, timed)]


def _tensor_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.requires_grad


def _model_key(model: torch.nn.Module) -> tuple:
    """What a meta trace reads of a model besides its code: its module tree, its parameters
    (shape, dtype, whether trained), its buffers and its checkpointed blocks."""
    return (
        tuple(type(m).__qualname__ for m in model.modules()),
        tuple(_tensor_key(p) for p in model.parameters()),
        tuple(_tensor_key(b) for b in model.buffers()),
        tuple(getattr(model, "checkpointed_blocks", ())),
    )


def _checkpointed_fraction(cfg: Config, engine: str) -> float:
    """Blocks 0, K, 2K, ... of model.gradient_checkpointing's stride K for `engine`, as a
    fraction of the blocks (an approximation of the recomputed share of a forward's FLOPs)."""
    every = cfg.model.checkpoint_every(engine)
    return 0.0 if every == 0 else 1.0 / every


def ladd_engine_steps(
    cfg: Config, configs: dict[str, dict], layouts: dict[str, zero3_replay.EngineLayout]
) -> list[comms_plan.EngineStep]:
    """What each engine of a LADD step does, for the communication plan: its events and backwards
    per step (comms_plan.ladd_schedule) and its FLOPs: a forward F (ladd_layouts), a backward 2F
    for a trained model and F for the teacher (input gradients only), a recompute F per backward
    with gradient checkpointing; the heads' forward in the discriminator step runs on 2B
    samples."""
    schedule = comms_plan.ladd_schedule(cfg)
    a = cfg.optim.grad_accum
    # The fraction of a forward a backward recomputes: the checkpointed blocks' share of the blocks.
    ckpt = {k: _checkpointed_fraction(cfg, k) for k in ("student", "teacher")}
    extra_teacher = schedule["teacher"][0].count("F") - 2 * a  # guidance passes of the distillation target
    fs, ft, fh = (layouts[k].flops for k in ("student", "teacher", "heads"))
    flops = {
        "student": a * (3 + ckpt["student"]) * fs + (0 if cfg.ladd.reuse_fakes else a * fs),
        "teacher": a * (2 + ckpt["teacher"]) * ft + extra_teacher * ft + a * ft * (1 if cfg.ladd.reuse_fakes else 2),
        "heads": a * 2 * fh + a * 6 * fh,
    }
    return [
        comms_plan.EngineStep(
            name=name,
            layout=layouts[name],
            stage=ds.zero_stage(configs[name]),
            ds_config=configs[name],
            events=schedule[name][0],
            reductions=schedule[name][1],
            flops=flops[name],
        )
        for name in ("student", "heads", "teacher")
    ]


def ladd_comms_plan(cfg: Config, world: int, configs: dict[str, dict], layouts: dict) -> comms_plan.CommsPlan:
    """The communication plan of a LADD step with these DeepSpeed configs (deepspeed.interconnect
    times it; without one, bytes only)."""
    net = cfg.deepspeed.interconnect
    interconnect = (
        None if net is None else comms_plan.Interconnect.from_gbps(net.intra_node_gbps, net.inter_node_gbps, net.gpus_per_node)
    )
    return comms_plan.plan_step(
        ladd_engine_steps(cfg, configs, layouts),
        world=world,
        precision=cfg.deepspeed.precision,
        net=interconnect,
        tflops=cfg.deepspeed.achieved_tflops,
    )


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return place_ladd_engines(cfg, world)[0]


def place_ladd_engines(cfg: Config, world: int, *, plan_always: bool = False, flops: bool = False):
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
        else:  # what the count leaves them as, so that the plan's traces see the same models either way
            as_engines_hold(cfg, models)
        return _STEP_ACTIVATIONS[key]

    layouts: dict = {}

    def step_time(models: dict, stages: dict[str, int]) -> float:
        configs = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable, stage=stages[s.name]) for s in ENGINES}
        configs = resolve_sizes(configs, models)  # the gather sizes the engines would get
        if not layouts:  # one trace of the models serves every candidate placement
            layouts.update(ladd_layouts(cfg, configs, models))
        return ladd_comms_plan(cfg, world, configs, layouts).step_s

    timed = step_time if cfg.deepspeed.interconnect is not None else None
    window = ladd_zero3_window(cfg, world)
    return place_engines(cfg, world, ENGINES, meta_models, activations, plan_always, step_time=timed, zero3_window=window)


def ladd_zero3_window(cfg: Config, world: int) -> Callable[[dict, str, dict], float]:
    """`window(models, engine, ds_config)`: the most elements of non-persistent parameters ZeRO-3
    holds gathered for the engine in a LADD step with that DeepSpeed config, the step's gathers
    replayed on the engine's module order (training/zero3_replay.py); the memory plan's ZeRO-3
    live term. The engine's model is traced (ladd_layouts: once per process and persistence
    threshold), and replayed once per setting."""
    windows: dict[tuple, float] = {}

    def window(models: dict, name: str, ds_config: dict) -> float:
        zero = ds_config.get("zero_optimization", {})
        key = (name, json.dumps(zero, sort_keys=True))
        if key not in windows:
            as_zero3 = {**ds_config, "zero_optimization": {**zero, "stage": 3}}
            layout = ladd_layouts(cfg, dict.fromkeys(models, as_zero3), models, flops=False, engines=(name,))[name]
            events = comms_plan.ladd_schedule(cfg)[name][0]
            windows[key] = zero3_replay.replay(layout, events, world=world, zero=zero).peak_live
        return windows[key]

    return window


_STEP_ACTIVATIONS: dict[str, StepActivations] = {}


def validation_plan(cfg: Config, world: int, models: dict, taps: list[int], steps: StepActivations) -> list[str]:
    """The dry run's validation lines: its FLOPs per rank against a training step's (the step
    plan's count, times optim.grad_accum), on eval.data's buckets or, without them, on
    eval.num_samples samples of the planned training shape."""
    shapes = validation.held_out_shapes(cfg)
    where = "its buckets"
    if shapes is None:
        h, w, text, _ = planned_shapes(cfg, models["teacher"].transformer.config)
        shapes = {"training shape": validation.HeldOutShape(cfg.eval.num_samples, h, w, text)}
        where = f"eval.num_samples {cfg.eval.num_samples} samples of the planned training shape"
    cost = validation.validation_cost(cfg, models, taps, shapes, world)
    return validation.cost_lines(cfg, cost, steps.flops * cfg.optim.grad_accum, where)


def dry_run(cfg: Config, world: int) -> DryRunReport:
    """Validate, build the models on the meta device, count parameters, plan memory; no engines.
    The report's problems: unusable data, a plan that does not fit."""
    check_task_teacher(cfg)
    check_data_matches_model(cfg)
    configs, placement = place_ladd_engines(cfg, world, plan_always=True, flops=True)
    check_compile_stages(cfg, {"student_stage": configs["student"], "teacher_stage": configs["teacher"]})
    teacher, student, heads, taps = build_models(cfg, device="meta")
    lines = [f"taps: {taps} ({len(taps)} heads); precision {cfg.deepspeed.precision}; world size {world}"]
    data_lines, problems = dry_run_data_lines(cfg, world, TASK_LAYOUTS[cfg.ladd.task])
    lines += [*data_lines, ""]
    lines += placement_report(cfg, placement)
    models = {"teacher": teacher, "student": student, "heads": heads}
    as_engines_hold(cfg, models)  # as the plan's: its traces (ladd_layouts) serve this one too
    comms = ladd_comms_plan(cfg, world, configs, ladd_layouts(cfg, configs, models))
    lines += ["", *comms_plan.format_plan(comms)]
    lines += ["", *validation_plan(cfg, world, models, taps, placement.steps)]
    return DryRunReport("\n".join(lines), problems + placement_problems(placement))
