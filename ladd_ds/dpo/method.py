"""Diffusion-DPO as a training method (ladd_ds.training.method.Method) for the shared loop.

Engines: `model`, built from model.teacher with the student's DeepSpeed template (ZeRO-3 by
default) and trained with dpo.lr; in LoRA mode only its adapters are trainable. In full mode a
frozen `reference` engine (deepspeed.teacher_config) holds the starting weights.
"""

from __future__ import annotations

from ladd_ds.config import Config
from ladd_ds.data.schema import PAIRS
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import print0
from ladd_ds.dpo.steps import DPOEngines, DPOSteps
from ladd_ds.models.flow_model import build_flow_model
from ladd_ds.models.lora import add_lora, lora_config_from
from ladd_ds.training.build import check_compile_stages, engine_ds_config, memory_plan
from ladd_ds.training.method import Method


def build_dpo_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    configs = {"model": engine_ds_config(cfg, world, "student_config", trainable=True)}
    if cfg.dpo.mode == "full":
        configs["reference"] = engine_ds_config(cfg, world, "teacher_config", trainable=False)
    return configs


def dpo_dry_run(cfg: Config, world: int) -> str:
    """Build the model on the meta device (with its LoRA), count parameters, plan memory per rank."""
    configs = build_dpo_ds_configs(cfg, world)
    check_compile_stages(cfg, {"student_config": configs["model"], "teacher_config": configs.get("reference")})
    model = build_flow_model(cfg.model.teacher, cfg.run.seed, device="meta")
    if cfg.dpo.mode == "lora":
        add_lora(model.transformer, lora_config_from(cfg.dpo.lora))
    else:
        model.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision, gib = cfg.deepspeed.precision, 2**30
    stage = ds.zero_stage(configs["model"])
    plans = [("model (frozen part)", memory_plan(total - trained, False, precision, stage, world))]
    plans.append(("model (trained part)", memory_plan(trained, True, precision, stage, world)))
    if "reference" in configs:
        plans.append(("reference", memory_plan(total, False, precision, ds.zero_stage(configs["reference"]), world)))
    lines = [
        f"DPO mode {cfg.dpo.mode}: {total:,} parameters, {trained:,} trained ({100 * trained / total:.2f}%); "
        f"precision {precision}; world size {world}; model ZeRO stage {stage}",
        "",
        f"{'part':<22}{'weights':>10}{'grads':>10}{'optim':>10}{'total GiB/rank':>16}",
    ]
    for name, plan in plans:
        lines.append(
            f"{name:<22}{plan['weights'] / gib:>10.2f}{plan['grads'] / gib:>10.2f}{plan['optimizer'] / gib:>10.2f}"
            f"{sum(plan.values()) / gib:>16.2f}"
        )
    lines.append(f"{'all':<22}{'':>30}{sum(sum(p.values()) for _, p in plans) / gib:>16.2f}")
    lines.append("Activations, communication buffers and the CUDA context are not included.")
    return "\n".join(lines)


class DPOMethod(DPOSteps, Method):
    kind = "dpo"
    layout = PAIRS
    trainable = ("model",)  # a full-mode reference is rebuilt from model.teacher
    progress_desc = "dpo"
    postfix_metrics = {"loss": "dpo/loss", "acc": "dpo/implicit_acc"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        cfg.check_command("dpo")  # also checked when the `ladd-ds dpo` command loads the config
        if cfg.logging.sample_every > 0:
            print0("note: logging.sample_every is ignored by `ladd-ds dpo` (sample grids are LADD-only)")

    @classmethod
    def ds_configs(cls, cfg: Config, world: int) -> dict[str, dict]:
        return build_dpo_ds_configs(cfg, world)

    @classmethod
    def build(cls, cfg: Config, ds_configs: dict[str, dict]) -> DPOMethod:
        check_compile_stages(cfg, {"student_config": ds_configs["model"], "teacher_config": ds_configs.get("reference")})
        model = build_flow_model(cfg.model.teacher, cfg.run.seed, ds_config=ds_configs["model"])
        if cfg.model.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        if cfg.model.compile:
            model.compile_blocks()  # compiled lazily: the LoRA layers added below are traced too
        reference = None
        if cfg.dpo.mode == "lora":
            trainable = add_lora(model.transformer, lora_config_from(cfg.dpo.lora), seed=cfg.run.seed)
            print0(f"LoRA rank {cfg.dpo.lora.rank} on {len(trainable) // 2} layers; the reference is the model with adapters off")
        else:
            ref_model = build_flow_model(cfg.model.teacher, cfg.run.seed, ds_config=ds_configs["reference"])
            ref_model.requires_grad_(False).eval()
            if cfg.model.compile:
                ref_model.compile_blocks()
            reference = ds.frozen_engine(ref_model, ds_configs["reference"])
        engine = ds.trainable_engine(model, ds_configs["model"], cfg.dpo.lr, cfg.optim)
        return cls(cfg, DPOEngines(model=engine, reference=reference, ds_configs=ds_configs), ds.device())

    def trained_module(self):
        return self.engines.model.module
