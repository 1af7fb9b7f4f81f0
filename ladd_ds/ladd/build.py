"""Building a LADD run: teacher, student and discriminator heads, their DeepSpeed configs, and
the --dry-run report."""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.distributed import engines as ds
from ladd_ds.models.activations import model_activation_bytes
from ladd_ds.models.flow_model import FlowModel, build_flow_model
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.training import comms_plan
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


def ladd_layouts(cfg: Config, configs: dict[str, dict], models: dict) -> dict[str, comms_plan.EngineLayout]:
    """Each model's module order and FLOPs for the communication plan: one forward of each on
    meta tensors of the planned shapes (the teacher frozen, its input requiring grad as the fakes
    do; the heads on the teacher's features). FLOPs only with deepspeed.interconnect: without
    one nothing is timed."""
    teacher, student = models["teacher"], models["student"]
    taps = resolve_taps(cfg.discriminator.taps, teacher.num_blocks)
    tc = teacher.transformer.config
    h, w, text, _ = planned_shapes(cfg, tc)
    b = cfg.data.micro_batch_size
    with torch.device("meta"):
        x = torch.randn(b, tc.in_channels, h, w)  # (B, C, H, W): the transformer's input (model_input)
        t = torch.rand(b)  # (B,)
        embeds, pooled = torch.randn(b, text, tc.joint_attention_dim), torch.randn(b, tc.pooled_projection_dim)
    checkpointed = "transformer_blocks" if cfg.model.gradient_checkpointing else None
    full = cfg.ladd.distill_weight > 0
    # The traces run without checkpointing: the blocks are named by `checkpointed` instead, and on
    # the meta device torch's checkpoint wrapper only adds time (most of an 8B trace's, profiled).
    flags = {m: m.transformer.gradient_checkpointing for m in (teacher, student)}
    for m in flags:
        m.transformer.gradient_checkpointing = False
    try:
        return _trace_ladd_models(cfg, configs, models, taps, (x, t, embeds, pooled), checkpointed, full)
    finally:
        for m, flag in flags.items():
            m.transformer.gradient_checkpointing = flag


def _trace_ladd_models(cfg, configs, models, taps, inputs, checkpointed, full) -> dict[str, comms_plan.EngineLayout]:
    teacher, student, heads = models["teacher"], models["student"], models["heads"]
    x, t, embeds, pooled = inputs
    timed = cfg.deepspeed.interconnect is not None

    def threshold(name):
        return float(configs[name].get("zero_optimization", {}).get("stage3_param_persistence_threshold", 1e5))

    s_layout, _ = comms_plan.trace_model(
        student,
        lambda m: m(x, t, embeds, pooled),
        persistence_threshold=threshold("student"),
        checkpointed=checkpointed,
        count_flops=timed,
    )
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        x_fake = x.detach().requires_grad_(True)
        t_layout, out = comms_plan.trace_model(
            teacher,
            lambda m: m(x_fake, t, embeds, pooled, taps=taps, velocity=full),
            persistence_threshold=threshold("teacher"),
            checkpointed=checkpointed,
            count_flops=timed,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    features = out[0] if full else out
    h_layout, _ = comms_plan.trace_model(
        heads, lambda m: m(features, t, pooled), persistence_threshold=threshold("heads"), frozen_too=True, count_flops=timed
    )
    return {"student": s_layout, "teacher": t_layout, "heads": h_layout}


def ladd_engine_steps(
    cfg: Config, configs: dict[str, dict], layouts: dict[str, comms_plan.EngineLayout]
) -> list[comms_plan.EngineStep]:
    """What each engine of a LADD step does, for the communication plan: its events and backwards
    per step (comms_plan.ladd_schedule) and its FLOPs: a forward F (ladd_layouts), a backward 2F
    for a trained model and F for the teacher (input gradients only), a recompute F per backward
    with gradient checkpointing; the heads' forward in the discriminator step runs on 2B
    samples."""
    schedule = comms_plan.ladd_schedule(cfg)
    a, ckpt = cfg.optim.grad_accum, 1 if cfg.model.gradient_checkpointing else 0
    extra_teacher = schedule["teacher"][0].count("F") - 2 * a  # guidance passes of the distillation target
    fs, ft, fh = (layouts[k].flops for k in ("student", "teacher", "heads"))
    flops = {
        "student": a * (3 + ckpt) * fs + (0 if cfg.ladd.reuse_fakes else a * fs),
        "teacher": a * (2 + ckpt) * ft + extra_teacher * ft + a * ft * (1 if cfg.ladd.reuse_fakes else 2),
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


def place_ladd_engines(cfg: Config, world: int, plan_always: bool = False):
    """(DeepSpeed config per engine, the memory plan or None): see training.build.place_engines."""

    def meta_models():
        teacher, student, heads, _ = build_models(cfg, device="meta")
        return {"teacher": teacher, "student": student, "heads": heads}

    layouts: dict = {}

    def step_time(models: dict, stages: dict[str, int]) -> float:
        configs = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable, stages[s.name]) for s in ENGINES}
        configs = resolve_sizes(configs, models)  # the gather sizes the engines would get
        if not layouts:  # one trace of the models serves every candidate placement
            layouts.update(ladd_layouts(cfg, configs, models))
        return ladd_comms_plan(cfg, world, configs, layouts).step_s

    timed = step_time if cfg.deepspeed.interconnect is not None else None
    return place_engines(
        cfg, world, ENGINES, meta_models, lambda models: step_activations(cfg, models)[0], plan_always, step_time=timed
    )


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
    models = {"teacher": teacher, "student": student, "heads": heads}
    comms = ladd_comms_plan(cfg, world, configs, ladd_layouts(cfg, configs, models))
    lines += ["", *comms_plan.format_plan(comms)]
    return DryRunReport("\n".join(lines), problems + placement_problems(placement))
