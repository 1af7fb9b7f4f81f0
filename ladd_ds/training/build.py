"""Building a run from its config: models, DeepSpeed configs, and the --dry-run report."""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.data.loader import bucket_dirs
from ladd_ds.data.schema import validate_mds_dir
from ladd_ds.distributed import engines as ds
from ladd_ds.models.flow_model import FlowModel
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.models.registry import (
    build_transformer,
    count_parameters,
    folder_weight_names,
    is_folder,
    read_folder_tensor,
    resolve_model_config,
)


def resolve_taps(taps: list[int] | None, num_blocks: int) -> list[int]:
    if taps is None:
        return list(range(num_blocks))
    bad = [i for i in taps if i >= num_blocks]
    if bad:
        raise ValueError(
            f"discriminator.taps: blocks {bad} do not exist (the teacher has {num_blocks} blocks, 0..{num_blocks - 1})"
        )
    return sorted(taps)


def build_flow_model(spec: str, seed: int, device: str = "cpu", ds_config: dict | None = None) -> FlowModel:
    """A FlowModel from a preset or folder; partitioned over the ranks under a ZeRO-3 `ds_config`."""
    if ds_config is None or device == "meta":
        return FlowModel(build_transformer(spec, seed=seed, device=device))
    with ds.partitioned_init(ds_config):
        model = FlowModel(build_transformer(spec, seed=seed, load_weights=ds.zero_stage(ds_config) < 3))
    if ds.zero_stage(ds_config) >= 3 and is_folder(spec):
        ds.load_partitioned_weights(model.transformer, folder_weight_names(spec), read_folder_tensor, spec)
    return model


def build_models(
    cfg: Config, device: str = "cpu", ds_configs: dict[str, dict] | None = None
) -> tuple[FlowModel, FlowModel, DiscriminatorHeads, list[int]]:
    """Teacher, student and heads. The student starts as a copy of the teacher (built again from
    the same preset seed or folder, which also works when both are partitioned under ZeRO-3)
    unless model.student names its own. With `ds_configs`, ZeRO-3 models are built partitioned."""
    ds_configs = ds_configs or {}
    teacher = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("teacher"))
    if cfg.model.student is None:
        student = build_flow_model(cfg.model.teacher, cfg.run.seed, device, ds_configs.get("student"))
    else:
        student = build_flow_model(cfg.model.student, cfg.run.seed + 1, device, ds_configs.get("student"))
    if cfg.model.gradient_checkpointing:
        teacher.transformer.enable_gradient_checkpointing()
        student.transformer.enable_gradient_checkpointing()
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


def engine_ds_config(cfg: Config, world: int, template_key: str, trainable: bool) -> dict:
    """One engine's DeepSpeed config: the JSON template at `deepspeed.<template_key>` with the
    run's batch sizes and precision (and gradient clipping for a trained engine)."""
    return ds.fill_ds_config(
        ds.load_template(getattr(cfg.deepspeed, template_key), f"deepspeed.{template_key}"),
        micro_batch_size=cfg.data.micro_batch_size,
        grad_accum=cfg.optim.grad_accum,
        world_size=world,
        precision=cfg.deepspeed.precision,
        grad_clip=cfg.optim.grad_clip if trainable else 0.0,
    )


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return {
        "student": engine_ds_config(cfg, world, "student_config", trainable=True),
        "heads": engine_ds_config(cfg, world, "heads_config", trainable=True),
        "teacher": engine_ds_config(cfg, world, "teacher_config", trainable=False),
    }


def check_data_matches_model(cfg: Config) -> None:
    """Fail before any engine is built when the data cannot feed the teacher."""
    model_cfg = resolve_model_config(cfg.model.teacher)
    if cfg.data.source == "random_latents":
        rl = cfg.data.random_latents
        checks = [
            ("data.random_latents.latent_channels", rl.latent_channels, "in_channels", model_cfg["in_channels"]),
            ("data.random_latents.text_dim", rl.text_dim, "joint_attention_dim", model_cfg["joint_attention_dim"]),
            ("data.random_latents.pooled_dim", rl.pooled_dim, "pooled_projection_dim", model_cfg["pooled_projection_dim"]),
        ]
        for key, value, model_key, expected in checks:
            if value != expected:
                raise ValueError(f"{key}={value} does not match the teacher's {model_key}={expected} ({cfg.model.teacher})")
        factor = model_cfg["patch_size"]
        if rl.height % factor or rl.width % factor:
            raise ValueError(f"data.random_latents: height/width must be divisible by the patch size {factor}")


def memory_plan(n_params: int, trainable: bool, precision: str, stage: int, world: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state for one engine.

    weights: 2 bytes/param in bf16, 4 in fp32; gradients: 4 (fp32); Adam: 8 (two fp32 moments)
    plus a 4-byte fp32 master copy when training in bf16. ZeRO-1 shards the optimizer state,
    ZeRO-2 also the gradients, ZeRO-3 also the weights, each over `world` ranks.
    """
    weight_b = 2 if precision == "bf16" else 4
    grad_b = 4 if trainable else 0
    optim_b = (8 + (4 if precision == "bf16" else 0)) if trainable else 0
    return {
        "weights": n_params * weight_b / (world if stage >= 3 else 1),
        "grads": n_params * grad_b / (world if stage >= 2 else 1),
        "optimizer": n_params * optim_b / (world if stage >= 1 else 1),
    }


def dry_run(cfg: Config, world: int) -> str:
    """Validate, build the models on the meta device, count parameters, plan memory; no engines."""
    check_data_matches_model(cfg)
    teacher, student, heads, taps = build_models(cfg, device="meta")
    ds_configs = build_ds_configs(cfg, world)
    gib = 2**30
    lines = [f"taps: {taps} ({len(taps)} heads); precision {cfg.deepspeed.precision}; world size {world}"]
    if cfg.data.source == "mds" and "://" in cfg.data.path:
        lines.append(f"data: remote {cfg.data.path}, cached in {cfg.data.cache_dir} (not checked in a dry run)")
    elif cfg.data.source == "mds":
        try:  # a memory plan is useful before the data exist: report, don't stop
            datasets = bucket_dirs(cfg.data.path) or [cfg.data.path]
            n = sum(validate_mds_dir(d)["num_samples"] for d in datasets)
            lines.append(f"data: {n} samples in {cfg.data.path} ({len(datasets)} bucket(s))")
        except (FileNotFoundError, ValueError) as e:
            lines.append(f"data: NOT USABLE, training would stop here: {e}")
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
