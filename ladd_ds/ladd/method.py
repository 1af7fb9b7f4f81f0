"""LADD as a training method (ladd_ds.training.method.Method): its config checks, dry run,
engines and checkpoint state around the step functions of `LADDSteps`. `LADDMethod` trains
text-to-image, `ConditionedLADDMethod` inpainting and editing (`ladd.task`);
ladd_ds.methods.method_for picks one by the config."""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError
from ladd_ds.data.checks import first_sample
from ladd_ds.data.loader import is_remote
from ladd_ds.data.manifest import check_text_settings, generation_guidance_scale, read_negative_prompt
from ladd_ds.data.schema import TASK_LAYOUTS, Layout
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import all_reduce_sum, print0, world_size
from ladd_ds.ladd.build import build_ds_configs, build_models, check_task_teacher, dry_run
from ladd_ds.ladd.conditioned import ConditionedLADDSteps
from ladd_ds.ladd.engines import build_engines
from ladd_ds.ladd.preview import SamplePreview
from ladd_ds.ladd.steps import LADDSteps
from ladd_ds.ladd.validation import Validation, check_eval_data, validated_steps
from ladd_ds.models.conditioning import batch_condition
from ladd_ds.training.build import DryRunReport, check_data_matches_model, check_mds_data, mds_data_plan
from ladd_ds.training.ema import ShardedEMA
from ladd_ds.training.method import Method


class LADDMethod(LADDSteps, Method):
    kind = "ladd"
    tasks: tuple[str, ...] = ("t2i",)  # the ladd.task values this class trains
    trainable = ("student", "heads")  # the frozen teacher is rebuilt, not saved
    progress_desc = "ladd"
    postfix_metrics = {"g": "loss/generator", "d": "loss/discriminator"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.ladd.task not in cls.tasks:  # a caller's mistake, not the user's: method_for picks the class
            raise ValueError(f"ladd.task={cfg.ladd.task}: {cls.__name__} trains {cls.tasks}; methods.method_for picks one")
        check_task_teacher(cfg)
        check_data_matches_model(cfg)
        if cfg.data.source == "mds":
            check_mds_data(cfg, cls.data_layout(cfg), world_size())
            check_text_settings(cfg.data.path, cfg.text)
        if cfg.eval.enabled:
            validated_steps(cfg)
            check_eval_data(cfg, cls.data_layout(cfg))
            check_text_settings(cfg.eval.data, cfg.text)

    @classmethod
    def data_layout(cls, cfg: Config) -> Layout:
        return TASK_LAYOUTS[cfg.ladd.task]

    @classmethod
    def dry_run(cls, cfg: Config, world: int) -> DryRunReport:
        return dry_run(cfg, world)

    @classmethod
    def ds_configs(cls, cfg: Config, world: int) -> dict[str, dict]:
        return build_ds_configs(cfg, world)

    @classmethod
    def build(cls, cfg: Config, ds_configs: dict[str, dict]) -> LADDMethod:
        teacher, student, heads, taps = build_models(cfg, ds_configs=ds_configs)
        engines = build_engines(student, teacher, heads, ds_configs, cfg.optim, leaf_blocks=cfg.deepspeed.z3_leaf_blocks)
        ema = None
        if cfg.optim.ema_decay > 0:
            ranges = ds.partition_ranges(engines.student)  # ZeRO-1/2: the EMA of this rank's partition
            ema = ShardedEMA(engines.student.module, cfg.optim.ema_decay, cfg.optim.ema_every, ranges=ranges)
        distill_cfg, negative = distill_guidance(cfg)
        return cls(cfg, engines, taps=taps, device=ds.device(), ema=ema, distill_cfg=distill_cfg, negative=negative)

    def preview(self):
        return SamplePreview(self.cfg, self.device) if self.cfg.logging.sample_every > 0 else None

    def validation(self):
        return Validation(self.cfg, self) if self.cfg.eval.enabled else None

    @property
    def ds_stages(self) -> dict[str, int]:
        """The ZeRO stage of each engine, by name."""
        return {name: ds.zero_stage(c) for name, c in self.engines.ds_configs.items()}

    def trained_module(self):
        return self.engines.student.module

    def extra_state(self) -> dict:
        return {"teacher_fingerprint": self.teacher_fingerprint()}

    def teacher_fingerprint(self) -> list[float]:
        """[sum, sum of squares] of the teacher's weights over all ranks: a cheap check, stored in
        every checkpoint, that the frozen teacher never changed."""
        local = torch.zeros(2, dtype=torch.float64)
        for p in self.engines.teacher.module.parameters():
            x = (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().double()
            local += torch.stack([x.sum(), x.pow(2).sum()]).cpu()
        sharded = self.ds_stages["teacher"] >= 3  # else every rank holds all of it
        return (all_reduce_sum(local) if sharded else local).tolist()


class ConditionedLADDMethod(ConditionedLADDSteps, LADDMethod):
    """LADD for inpainting and editing (`ladd.task`): LADDMethod with the conditioned steps."""

    tasks = ("inpaint", "edit")

    def preview(self):
        if self.cfg.logging.sample_every <= 0:
            return None
        condition = self.preview_condition()
        if condition is None:
            print0("logging.sample_every: no sample grids for an image-conditioned run without local data shards")
            return None
        return SamplePreview(self.cfg, self.device, condition)

    def preview_condition(self) -> torch.Tensor | None:
        """The condition channels (extra, h, w) of the training data's first sample, or None
        without local data shards (the previews of `data.source: random_latents` runs)."""
        if self.cfg.data.source != "mds" or is_remote(self.cfg.data.path):
            return None
        plan = mds_data_plan(self.cfg, self.data_layout(self.cfg), world_size())
        sample = first_sample(plan.datasets[0])
        return batch_condition({k: torch.from_numpy(sample[k]).float()[None] for k in self.condition_columns}, self.task)[0]


def distill_guidance(cfg: Config) -> tuple[float, tuple | None]:
    """The distillation target's guidance scale (ladd.distill_cfg, by default the one the data was
    generated with) and, when it is above 1, the empty prompt's conditioning stored with the data."""
    if cfg.ladd.distill_weight <= 0:
        return 1.0, None
    scale = cfg.ladd.distill_cfg
    if scale is None:
        scale = generation_guidance_scale(cfg.data.path) if cfg.data.source == "mds" else None
        if scale is None:
            print0("ladd.distill_cfg: data.path records no guidance scale (no manifest.json); using 1 (no guidance)")
            scale = 1.0
    print0(f"distillation target: teacher x0 with guidance scale {scale:g}")
    if scale == 1.0:
        return 1.0, None
    if cfg.data.source != "mds":
        raise InputError(f"ladd.distill_cfg = {scale:g} needs data from `ladd-ds synth` (data.source: mds); set it to 1")
    return scale, read_negative_prompt(cfg.data.path, needed_by=f"ladd.distill_cfg = {scale:g}")
