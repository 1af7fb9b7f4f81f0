"""What every method builds from its config: DeepSpeed configs per engine, the data-vs-model
check, and the memory plan of the --dry-run report."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ladd_ds.config import Config, ConfigError
from ladd_ds.core.errors import InputError
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.checks import DataPlan, check_stored_shapes, plan_mds_data
from ladd_ds.data.loader import is_remote
from ladd_ds.data.schema import LATENTS, Layout
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import print0
from ladd_ds.distributed.zero_sizes import has_auto_sizes, resolve_zero3_sizes
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.training.placement import (
    AUTO,
    USABLE_FRACTION,
    EngineNeeds,
    Placement,
    StepActivations,
    choose_placement,
    format_activations,
    format_placement,
)


def engine_ds_config(cfg: Config, world: int, template_key: str, trainable: bool, *, stage: int | None = None) -> dict:
    """One engine's DeepSpeed config: the JSON template at `deepspeed.<template_key>` with the
    run's batch sizes and precision (and gradient clipping for a trained engine); with `stage`,
    that ZeRO stage instead of the template's."""
    return ds.fill_ds_config(
        ds.load_template(getattr(cfg.deepspeed, template_key), f"deepspeed.{template_key}"),
        micro_batch_size=cfg.data.micro_batch_size,
        grad_accum=cfg.optim.grad_accum,
        world_size=world,
        precision=cfg.deepspeed.precision,
        grad_clip=cfg.optim.grad_clip if trainable else 0.0,
        stage=stage,
        trainable=trainable,
    )


CLIP_TOKENS = 77  # SD3's conditioning: 77 CLIP tokens, then text.max_sequence_length T5 tokens


def planned_shapes(cfg: Config, model_cfg: dict) -> tuple[int, int, int, str]:
    """(latent height, latent width, text tokens) the memory plan assumes, and a note on where
    they come from: the random-latent source's, else the model's native size and SD3's
    conditioning (77 CLIP + text.max_sequence_length T5 tokens)."""
    if cfg.data.source == "random_latents":
        rl = cfg.data.random_latents
        return rl.height, rl.width, rl.text_len, f"latent {rl.height}x{rl.width}, {rl.text_len} text tokens (data.random_latents)"
    size, text = model_cfg["sample_size"], CLIP_TOKENS + cfg.text.max_sequence_length
    return size, size, text, f"latent {size}x{size} (the model's sample_size), {text} text tokens"


def planned_adamw_kind(cfg: Config) -> str:
    """The torch AdamW implementation the plan counts temporaries for: the one this rank runs
    (engines.adamw_kind), or a GPU's fused one when deepspeed.device_memory_gib names the device
    (a plan made on a host without the GPUs it is for)."""
    return "fused" if cfg.deepspeed.device_memory_gib is not None else ds.adamw_kind()


def planned_device_bytes(cfg: Config) -> float:
    """The device memory `auto` placement plans against: deepspeed.device_memory_gib, or this
    rank's device."""
    if cfg.deepspeed.device_memory_gib is not None:
        return cfg.deepspeed.device_memory_gib * 2**30
    return ds.device_memory_bytes()


def training_dtype(cfg: Config) -> torch.dtype:
    """The dtype of deepspeed.precision: the one models are built in for their engines."""
    return dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")


def check_compile_stages(cfg: Config, configs: dict[str, dict | None]) -> None:
    """model.compile needs the compiled models' engines below ZeRO-3. `configs` maps each
    engine's stage key (student_stage, ...) to its DeepSpeed config (None: no engine).

    ZeRO-3 gathers a submodule's parameters in a forward hook that DeepSpeed excludes from
    compilation, so a compiled block breaks into a graph per submodule (deepspeed 0.19.8, CPU:
    the tiny model's 3 blocks made 112 graph breaks and 89 graphs; the losses were right)."""
    if not cfg.model.compile:
        return
    zero3 = [f"deepspeed.{key}" for key, c in configs.items() if c is not None and ds.zero_stage(c) >= 3]
    if zero3:
        verb = "use" if len(zero3) > 1 else "uses"
        raise ConfigError(
            f"model.compile: {' and '.join(zero3)} {verb} ZeRO-3, whose per-submodule gather hooks break a compiled "
            "block into a graph per submodule. Set a stage below 3 there (2 for a trained model, 0 for a frozen one; "
            "docs/performance.md) or model.compile: false"
        )


def check_data_matches_model(cfg: Config) -> None:
    """Fail before any engine is built when the data cannot feed the teacher."""
    model_cfg = resolve_model_config(cfg.model.teacher)
    if cfg.data.source == "random_latents":
        rl = cfg.data.random_latents
        checks = [
            ("data.random_latents.latent_channels", rl.latent_channels, "latent channels", latent_channels(model_cfg)),
            ("data.random_latents.text_dim", rl.text_dim, "joint_attention_dim", model_cfg["joint_attention_dim"]),
            ("data.random_latents.pooled_dim", rl.pooled_dim, "pooled_projection_dim", model_cfg["pooled_projection_dim"]),
        ]
        for key, value, model_key, expected in checks:
            if value != expected:
                raise InputError(f"{key}={value} does not match the teacher's {model_key}={expected} ({cfg.model.teacher})")
        factor = model_cfg["patch_size"]
        if rl.height % factor or rl.width % factor:
            raise InputError(f"data.random_latents: height/width must be divisible by the patch size {factor}")


def global_batch(cfg: Config, world: int) -> tuple[int, str]:
    """Samples per optimizer step, and how they are made up (for messages)."""
    micro, accum = cfg.data.micro_batch_size, cfg.optim.grad_accum
    return micro * accum * world, f"data.micro_batch_size {micro} x optim.grad_accum {accum} x {world} rank(s)"


def mds_data_plan(cfg: Config, layout: Layout, world: int) -> DataPlan | None:
    """The datasets the loader reads from data.path, checked (data.checks.plan_mds_data); None
    for random latents and for a remote path, which is not checked here: listing it needs the
    object store, and streaming reads its indexes when the loader is built."""
    if cfg.data.source != "mds" or is_remote(cfg.data.path):
        return None
    batch, note = global_batch(cfg, world)
    return plan_mds_data(cfg.data.path, layout, batch, note, cfg.data.drop_small_buckets)


def check_mds_data(cfg: Config, layout: Layout, world: int) -> None:
    """A method's check_config for data.source mds: buckets, sizes and stored shapes against
    model.teacher, before any model is built; dropped buckets are reported here, once."""
    plan = mds_data_plan(cfg, layout, world)
    if plan is None:
        return
    check_stored_shapes(plan, layout, resolve_model_config(cfg.model.teacher), cfg.model.teacher)
    if plan.dropped:
        batch, note = global_batch(cfg, world)
        print0(
            f"warning: data.drop_small_buckets: leaving out bucket(s) {plan.dropped} (name: samples) of {plan.path}, "
            f"smaller than one global batch of {batch} ({note}); training reads the other {len(plan.buckets)} "
            f"bucket(s), {plan.num_samples} samples"
        )


@dataclass(frozen=True)
class EngineSlot:
    """One engine of a method: its name, the deepspeed.* keys of its template and stage, whether
    it trains, whether its model is the one the run's EMA follows (optim.ema_decay > 0), and
    whether deepspeed.z3_leaf_blocks makes its blocks ZeRO-3 leaf modules (ladd/engines.py build_engines)."""

    name: str
    template_key: str
    stage_key: str
    trainable: bool
    keeps_ema: bool = False
    leaf_blocks: bool = False


def place_engines(
    cfg: Config,
    world: int,
    slots: list[EngineSlot],
    meta_models: Callable[[], dict[str, nn.Module]],
    activations: Callable[[dict[str, nn.Module]], StepActivations],
    plan_always: bool = False,
    step_time: Callable[[dict[str, nn.Module], dict[str, int]], float] | None = None,
    zero3_window: Callable[[dict[str, nn.Module], str, dict], float] | None = None,
) -> tuple[dict[str, dict], Placement | None]:
    """Every engine's DeepSpeed config with its ZeRO stage: the template's, the one set in
    deepspeed.<engine>_stage, or for "auto" the memory plan's (ladd_ds.training.placement).

    The plan needs the models (built on the meta device by `meta_models`) and the activation
    bytes of a training step's phases (`activations`); it is made only when a stage is "auto" or
    `plan_always` (the --dry-run report). `step_time(models, stages)`: seconds per step of a stage
    assignment (the communication plan); with it "auto" picks the fastest placement that fits.
    `zero3_window(models, engine, ds_config)`: the most elements ZeRO-3 keeps gathered for the
    engine in a step (placement.EngineNeeds.live_window)."""
    asked = {s.name: getattr(cfg.deepspeed, s.stage_key) for s in slots}
    templates = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable) for s in slots}
    if not plan_always and AUTO not in asked.values():
        configs = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable, stage=asked[s.name]) for s in slots}
        if any(has_auto_sizes(c) for c in configs.values()):
            configs = resolve_sizes(configs, meta_models())
        return configs, None
    models = meta_models()
    needs = [
        EngineNeeds(
            name=s.name,
            model=models[s.name],
            trainable=s.trainable,
            stage=ds.zero_stage(templates[s.name]) if asked[s.name] is None else asked[s.name],
            ds_config=templates[s.name],
            ema=s.keeps_ema and cfg.optim.ema_decay > 0,
            adamw=planned_adamw_kind(cfg),
            leaf_blocks=s.leaf_blocks and cfg.deepspeed.z3_leaf_blocks,
            live_window=None if zero3_window is None else functools.partial(zero3_window, models, s.name),
        )
        for s in slots
    ]
    steps = activations(models)
    placement = choose_placement(
        needs,
        world=world,
        precision=cfg.deepspeed.precision,
        grad_accum=cfg.optim.grad_accum,
        activations=steps.peak,
        device_bytes=planned_device_bytes(cfg),
        step_time=None if step_time is None else lambda stages: step_time(models, stages),
    )
    placement.steps = steps
    for s in slots:
        if asked[s.name] is None:
            placement.reasons[s.name] = f"the template's ({getattr(cfg.deepspeed, s.template_key)})"
    configs = {s.name: engine_ds_config(cfg, world, s.template_key, s.trainable, stage=placement.stages[s.name]) for s in slots}
    configs = resolve_sizes(configs, models)
    if not plan_always:
        for s in slots:
            if asked[s.name] == AUTO:
                print0(f"deepspeed.{s.stage_key}: auto -> ZeRO-{placement.stages[s.name]} ({placement.reasons[s.name]})")
        if not placement.fits:
            need = placement.total / 2**30
            print0(f"warning: the memory plan ({need:.1f} GiB per rank) exceeds the device's usable memory; see --dry-run")
    return configs, placement


def resolve_sizes(configs: dict[str, dict], models: dict[str, nn.Module]) -> dict[str, dict]:
    """Each engine's ZeRO-3 "auto" live and prefetch sizes from its model (about two of its
    blocks: distributed/zero_sizes.py), the values the memory plan counts too."""
    return {name: resolve_zero3_sizes(c, models[name]) for name, c in configs.items()}


def placement_report(cfg: Config, placement: Placement) -> list[str]:
    """The --dry-run memory table and the reason for every engine's stage."""
    gib, usable = 2**30, placement.device_bytes * USABLE_FRACTION
    lines = format_placement(placement)
    steps = placement.steps
    lines.append(f"{'activations':<20}{placement.activations / gib:>79.2f}   peak: the {steps.peak_phase}; {steps.note}")
    lines += format_activations(steps, 79)
    verdict = "fits" if placement.fits else "DOES NOT FIT: training would run out of device memory"
    lines += [
        f"{'total':<20}{placement.total / gib:>79.2f}   of {usable / gib:.1f} GiB usable "
        f"({USABLE_FRACTION:.0%} of {placement.device_bytes / gib:.1f} GiB per device): {verdict}",
        "",
        "stages:",
    ]
    lines += [f"  {name}: ZeRO-{placement.stages[name]}, {placement.reasons[name]}" for name in placement.stages]
    lines += [
        "",
        "per rank: weights 2 B/param in bf16 (4 in fp32), sharded by ZeRO-3; grads in the model dtype below ZeRO-2,",
        "an fp32 partition from ZeRO-2 on; Adam 12 B/param in bf16 (8 in fp32), sharded from ZeRO-1 on; opt tmp:",
        "what torch AdamW's step allocates (none fused); EMA (optim.ema_decay > 0): an fp32 copy of the trained",
        "weights, 4 B/param, sharded from ZeRO-1 on; buffers: reduce / all-gather buckets and ZeRO-3 live",
        "parameters; activations: what each phase keeps for backward, counted from the code, and the",
        'largest checkpointed block recomputed in backward (docs/performance.md, "Placement").',
    ]
    if steps.recompute_flops:
        lines.append(f"gradient checkpointing: recompute +{steps.recompute_flops:.1%} FLOPs per step")
    return lines


@dataclass
class DryRunReport:
    """What `--dry-run` prints (`text`) and why the run could not start (`problems`, each a
    sentence naming the setting and what to do; empty when it could)."""

    text: str
    problems: list[str]


def dry_run_data_lines(cfg: Config, world: int, layout: Layout = LATENTS) -> tuple[list[str], list[str]]:
    """The --dry-run report's data line: how many samples data.path holds, or why it is not
    usable; and that reason as a problem (the report is printed in full either way: a memory
    plan is useful before the data exist)."""
    if cfg.data.source != "mds":
        return [], []
    if is_remote(cfg.data.path):
        return [f"data: remote {cfg.data.path}, cached in {cfg.data.cache_dir} (not checked in a dry run)"], []
    try:
        plan = mds_data_plan(cfg, layout, world)
        check_stored_shapes(plan, layout, resolve_model_config(cfg.model.teacher), cfg.model.teacher)
    except (FileNotFoundError, ValueError) as e:
        return [f"data: NOT USABLE, training would stop here: {e}"], [f"data: {e}"]
    dropped = f"; dropped (data.drop_small_buckets): {plan.dropped}" if plan.dropped else ""
    return [f"data: {plan.num_samples} samples in {cfg.data.path} ({len(plan.datasets)} bucket(s){dropped})"], []


def placement_problems(placement: Placement) -> list[str]:
    """The memory plan's verdict as a problem when the run does not fit (the plan is an estimate:
    training itself only warns; a dry run, asked whether the run can start, says no)."""
    if placement.fits:
        return []
    gib = 2**30
    return [
        f"memory: the plan needs {placement.total / gib:.1f} GiB per rank, more than the "
        f"{placement.device_bytes * USABLE_FRACTION / gib:.1f} GiB usable; use more ranks (--world-size), ZeRO-3 "
        "(deepspeed.student_stage / teacher_stage), model.gradient_checkpointing or a smaller data.micro_batch_size"
    ]
