"""Diffusion-DPO as a training method (ladd_ds.training.method.Method) for the shared loop.

Engines (dpo/engines.py): `model`, built from model.teacher with the student's DeepSpeed template (ZeRO-3 by
default) and trained with dpo.lr; in LoRA mode only its adapters are trainable. In full mode a
frozen `reference` engine (deepspeed.teacher_config) holds the starting weights.
"""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.data.schema import PAIRS
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import print0, world_size
from ladd_ds.dpo.engines import build_dpo_engines
from ladd_ds.dpo.steps import DPOSteps, dpo_time_shift
from ladd_ds.models.activations import RecomputeFlops, model_activation_bytes, recompute_bytes
from ladd_ds.models.flow_model import build_flow_model
from ladd_ds.models.lora import add_lora, lora_config_from
from ladd_ds.training.build import (
    DryRunReport,
    EngineSlot,
    check_compile_stages,
    check_mds_data,
    dry_run_data_lines,
    place_engines,
    placement_problems,
    placement_report,
    planned_shapes,
    training_dtype,
)
from ladd_ds.training.method import Method
from ladd_ds.training.placement import StepActivations


def dpo_slots(cfg: Config) -> list[EngineSlot]:
    slots = [EngineSlot("model", "student_config", "student_stage", trainable=True)]
    if cfg.dpo.mode == "full":
        slots.append(EngineSlot("reference", "teacher_config", "teacher_stage", trainable=False))
    return slots


def meta_dpo_models(cfg: Config) -> dict:
    """The model (with its LoRA adapters in LoRA mode) and the full-mode reference, on the meta
    device: what the memory plan counts."""
    model = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, device="meta")
    if cfg.dpo.mode == "lora":
        add_lora(model.transformer, lora_config_from(cfg.dpo.lora))
    else:
        model.requires_grad_(True)
    model.set_checkpointing(cfg.model.checkpoint_every("student"))
    models = {"model": model}
    if cfg.dpo.mode == "full":
        models["reference"] = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, device="meta").requires_grad_(False)
    return models


def dpo_activations(cfg: Config, models: dict, flops: bool = False) -> StepActivations:
    """Bytes autograd holds in a DPO step: the model's forward on winners and losers together
    (2 x micro-batch; the reference runs without gradients), counted on the meta model, with the
    largest checkpointed block's recompute; and the FLOPs that recompute adds to the step."""
    dtype = training_dtype(cfg)
    model = models["model"].to(dtype)
    tc = model.transformer.config
    h, w, text, note = planned_shapes(cfg, tc)
    batch = 2 * cfg.data.micro_batch_size
    shapes = {"batch": batch, "latent_hw": (h, w), "text_tokens": text, "dtype": dtype}
    kept = model_activation_bytes(model, **shapes)
    shapes_in = [(tc.in_channels, h, w), (), (text, tc.joint_attention_dim), (tc.pooled_projection_dim,)]
    inputs = [torch.empty(batch, *shape, device="meta", dtype=dtype) for shape in shapes_in]  # x, t, text, pooled

    relative = 0.0
    if flops:  # a forward and backward on meta tensors: seconds at 8B, so for --dry-run only
        with RecomputeFlops() as counted:
            with torch.no_grad():
                model(*inputs)  # the reference's pass: the same shapes and code
            model(*inputs).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        relative = counted.relative
    every = model.checkpoint_stride
    policy = {0: "none", 1: "all"}.get(every, f"every:{every}")
    return StepActivations(
        kept={"step": {"model": kept}},
        recompute={"step": recompute_bytes(model, **shapes)},
        recompute_flops=relative,
        note=f"batch {batch} (winners and losers), {note}, checkpointing {policy}",
    )


def place_dpo_engines(cfg: Config, world: int, *, plan_always: bool = False, flops: bool = False):
    def activations(models):
        return dpo_activations(cfg, models, flops=flops)

    return place_engines(cfg, world, dpo_slots(cfg), lambda: meta_dpo_models(cfg), activations, plan_always)


def build_dpo_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    return place_dpo_engines(cfg, world)[0]


def dpo_dry_run(cfg: Config, world: int) -> DryRunReport:
    """Build the model on the meta device (with its LoRA), count parameters, plan memory per rank,
    check the pairs at data.path. The report's problems: unusable pairs, a plan that does not fit."""
    configs, placement = place_dpo_engines(cfg, world, plan_always=True, flops=True)
    check_compile_stages(cfg, {"student_stage": configs["model"], "teacher_stage": configs.get("reference")})
    models = meta_dpo_models(cfg)
    model = models["model"]
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"DPO mode {cfg.dpo.mode}: {total:,} parameters, {trained:,} trained ({100 * trained / total:.2f}%); "
        f"precision {cfg.deepspeed.precision}; world size {world}",
        f"DPO times: logit-normal({cfg.dpo.t_mean:g}, {cfg.dpo.t_std:g}) shifted by {dpo_time_shift(cfg):g} "
        f"({'dpo.time_shift' if cfg.dpo.time_shift is not None else 'model.teacher sampling shift'})",
    ]
    data_lines, problems = dry_run_data_lines(cfg, world, PAIRS)
    lines += [*data_lines, ""]
    lines += placement_report(cfg, placement)
    return DryRunReport("\n".join(lines), problems + placement_problems(placement))


class DPOMethod(DPOSteps, Method):
    kind = "dpo"
    layout = PAIRS
    trainable = ("model",)  # a full-mode reference is rebuilt from model.teacher
    progress_desc = "dpo"
    postfix_metrics = {"loss": "dpo/loss", "acc": "dpo/implicit_acc"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        cfg.check_command("dpo")  # also checked when the `ladd-ds dpo` command loads the config
        check_mds_data(cfg, cls.layout, world_size())
        if cfg.logging.sample_every > 0:
            print0("note: logging.sample_every is ignored by `ladd-ds dpo` (sample grids are LADD-only)")

    @classmethod
    def dry_run(cls, cfg: Config, world: int) -> DryRunReport:
        return dpo_dry_run(cfg, world)

    @classmethod
    def ds_configs(cls, cfg: Config, world: int) -> dict[str, dict]:
        return build_dpo_ds_configs(cfg, world)

    @classmethod
    def build(cls, cfg: Config, ds_configs: dict[str, dict]) -> DPOMethod:
        check_compile_stages(cfg, {"student_stage": ds_configs["model"], "teacher_stage": ds_configs.get("reference")})
        dtype = training_dtype(cfg)
        model = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, ds_config=ds_configs["model"], dtype=dtype)
        model.set_checkpointing(cfg.model.checkpoint_every("student"))  # the reference runs without gradients
        if cfg.model.compile:
            model.compile_blocks()  # compiled lazily: the LoRA layers added below are traced too
        ref_model = None
        if cfg.dpo.mode == "lora":
            trainable = add_lora(model.transformer, lora_config_from(cfg.dpo.lora), seed=cfg.run.seed)
            print0(f"LoRA rank {cfg.dpo.lora.rank} on {len(trainable) // 2} layers; the reference is the model with adapters off")
        else:
            ref_model = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, ds_config=ds_configs["reference"], dtype=dtype)
            ref_model.requires_grad_(False).eval()
            if cfg.model.compile:
                ref_model.compile_blocks()
        engines = build_dpo_engines(model, ref_model, ds_configs, lr=cfg.dpo.lr, optim_cfg=cfg.optim)
        return cls(cfg, engines, ds.device())

    def trained_module(self):
        return self.engines.model.module
