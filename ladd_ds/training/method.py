"""The contract between the training loop (`ladd_ds.training.trainer.Trainer`) and a method.

The loop owns data, logging, checkpoints, resume and health; a method owns its engines and the
mathematics of one optimizer step. The methods are LADD (`ladd_ds.ladd.method.LADDMethod`), its
image-conditioned variant for inpainting and editing (`ConditionedLADDMethod`, which overrides
the steps' model input) and Diffusion-DPO (`ladd_ds.dpo.method.DPOMethod`);
`ladd_ds.methods.method_for(cfg, command)` picks the class a run trains with. Each method's
engines live in its own package (ladd/engines.py, dpo/engines.py).

`--dry-run` calls only `dry_run(cfg, world)`: the models on the meta device, the memory plan
and the data checks for `world` ranks, no engines. The loop calls, in this order:
  1. `check_config(cfg)`                      before anything is built: fail early, with the key
  2. `ds_configs(cfg, world)`                 one DeepSpeed config per engine, by name
  3. `build(cfg, ds_configs)`                 the models and engines (resume may have edited the
                                              configs), passed whole to the constructor
  4. `train_step(micro_batches, step)`        per optimizer step; returns metrics (floats or
                                              0-dim device tensors, which the loop reads on
                                              logging steps only) and a float
                                              "health/step_skipped" (1.0 when DeepSpeed skipped
                                              the update for a non-finite gradient norm)
  and, for checkpoints and export, `trainable_engines()`, `trained_module()`, `ema`,
  `extra_state()`; for TensorBoard grids, `preview()`; for validation during training (eval.every),
  `validation()`.
"""

from __future__ import annotations

from torch import nn

from ladd_ds.config import Config
from ladd_ds.data.schema import LATENTS, Layout
from ladd_ds.training.build import DryRunReport


class Method:
    kind = "base"  # recorded in every checkpoint; `ladd-ds export` picks the exporter by it
    layout: Layout = LATENTS  # the dataset kind the loader reads
    trainable: tuple[str, ...] = ()  # engines saved in checkpoints (frozen ones are rebuilt)
    progress_desc = "train"
    postfix_metrics: dict[str, str] = {}  # progress-bar label -> metric key
    ema = None  # a ShardedEMA of trained_module(), or None; saved with the rank's state

    # ---------------------------------------------------------------- before the engines

    @classmethod
    def data_layout(cls, cfg: Config) -> Layout:
        """The dataset kind this run reads (a method whose data depends on the config overrides it)."""
        return cls.layout

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise a ConfigError (or ValueError) naming the key when the config cannot work."""

    @classmethod
    def dry_run(cls, cfg: Config, world: int) -> DryRunReport:
        """`--dry-run`: build the models on the meta device, count parameters, plan memory per rank
        for `world` ranks and check the data, without engines. The report's problems say why the
        run could not start."""
        raise NotImplementedError

    @classmethod
    def ds_configs(cls, cfg: Config, world: int) -> dict[str, dict]:
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: Config, ds_configs: dict[str, dict]) -> Method:
        """Build the models and their DeepSpeed engines; return the ready method, constructed
        with everything it holds."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the step

    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches (already on the device). `step`:
        the number of optimizer steps done before this one (noise draws and warm-up use it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state and outputs

    def trainable_engines(self) -> dict:
        return {name: getattr(self.engines, name) for name in self.trainable}

    def trained_module(self) -> nn.Module:
        """The network the EMA follows, previews sample and `ladd-ds export` writes."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Method-specific entries of the checkpoint's trainer state (JSON-serializable)."""
        return {}

    def preview(self):
        """An object whose `grids(module, dtype)` returns TensorBoard image grids, or None."""
        return None

    def validation(self):
        """An object whose `run(method)` returns (metrics, TensorBoard image grids), the same
        forwards on every rank, or None (eval.every 0, no eval.data, or a method without one)."""
        return None
