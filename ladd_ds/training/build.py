"""What every method builds from its config: DeepSpeed configs per engine, the data-vs-model
check, and the memory plan of the --dry-run report."""

from __future__ import annotations

from ladd_ds.config import Config, ConfigError
from ladd_ds.core.errors import InputError
from ladd_ds.data.loader import bucket_dirs
from ladd_ds.data.schema import LATENTS, Layout, validate_mds_dir
from ladd_ds.distributed import engines as ds
from ladd_ds.models.registry import resolve_model_config


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


def check_compile_stages(cfg: Config, configs: dict[str, dict | None]) -> None:
    """model.compile needs the compiled models' engines below ZeRO-3. `configs` maps each
    template key (student_config, ...) to its engine's DeepSpeed config (None: no engine).

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
            "block into a graph per submodule. Use a stage below 3 there (ds_configs/zero2.json for a trained model, "
            "ds_configs/zero0.json for a frozen one) or set model.compile: false"
        )


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
                raise InputError(f"{key}={value} does not match the teacher's {model_key}={expected} ({cfg.model.teacher})")
        factor = model_cfg["patch_size"]
        if rl.height % factor or rl.width % factor:
            raise InputError(f"data.random_latents: height/width must be divisible by the patch size {factor}")


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


def dry_run_data_lines(cfg: Config, layout: Layout = LATENTS) -> list[str]:
    """The --dry-run report's data line: how many samples data.path holds, or why it is not
    usable (a memory plan is useful before the data exist: report, don't stop)."""
    if cfg.data.source != "mds":
        return []
    if "://" in cfg.data.path:
        return [f"data: remote {cfg.data.path}, cached in {cfg.data.cache_dir} (not checked in a dry run)"]
    try:
        datasets = bucket_dirs(cfg.data.path) or [cfg.data.path]
        n = sum(validate_mds_dir(d, layout)["num_samples"] for d in datasets)
        return [f"data: {n} samples in {cfg.data.path} ({len(datasets)} bucket(s))"]
    except (FileNotFoundError, ValueError) as e:
        return [f"data: NOT USABLE, training would stop here: {e}"]
