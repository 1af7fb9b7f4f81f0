"""The Diffusion-DPO step on DeepSpeed engines (the LADD trainer's loop runs it; see
ladd_ds.dpo.method).

Per micro-batch of preference pairs: one t (logit-normal, shifted by dpo.time_shift) and one
noise draw per pair, shared by winner and loser; the reference's velocity errors without gradients (LoRA mode: the same
transformer with its adapters bypassed; full mode: a frozen copy); the model's errors through
its engine; the DPO loss (ladd_ds.dpo.loss); backward and step.
"""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.core import flow
from ladd_ds.core.noise import per_sample_generators, randn_like_per_sample, randn_per_sample, to_device
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.loader import batch_to_device
from ladd_ds.distributed import faults
from ladd_ds.dpo.engines import DPOEngines
from ladd_ds.dpo.loss import dpo_loss, velocity_errors
from ladd_ds.models.lora import adapters_disabled
from ladd_ds.models.scheduler import model_sampler_settings


def dpo_time_shift(cfg: Config) -> float:
    """dpo.time_shift, or (null) model.teacher's sampling shift: SD3 trains with the shift it
    samples with (3 at 1024 px), so DPO weights the errors at the times the model trained on."""
    if cfg.dpo.time_shift is not None:
        return cfg.dpo.time_shift
    return model_sampler_settings(cfg.model.teacher).shift


class DPOSteps:
    """Holds the engines and the DPO step; no data, logging or checkpoint concerns."""

    def __init__(self, cfg: Config, engines: DPOEngines, device: torch.device):
        self.cfg = cfg
        self.engines = engines
        self.device = device
        self.dtype = dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")
        self.time_shift = dpo_time_shift(cfg)
        self.ema = None
        self.step = 0

    def to_device(self, batch: dict) -> dict:
        return batch_to_device(batch, self.device, self.dtype)

    def draw_noise(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair: t ~ logit-normal(dpo.t_mean, dpo.t_std) shifted by `time_shift`, and eps,
        from the pair's sample id."""
        x = batch["latent_w"]
        g = per_sample_generators(batch["sample_id"], seed=self.cfg.run.seed, step=self.step, purpose="dpo")  # ids on the host
        d = self.cfg.dpo
        t = flow.shift_time(torch.sigmoid(d.t_mean + d.t_std * randn_per_sample(g)), self.time_shift)
        eps = randn_like_per_sample(x, g)
        return to_device(t, x.device, torch.float32), eps  # (B,) fp32 (see ladd.flow), (B, C, h, w)

    def reference_velocity(self, x_t, t, prompt_embeds, pooled) -> torch.Tensor:
        with torch.no_grad():
            if self.engines.reference is not None:
                return self.engines.reference.module(x_t, t, prompt_embeds, pooled)
            # `.module`, not the engine: a forward through the engine would be taken as the
            # training forward of this micro-batch.
            model = self.engines.model.module
            with adapters_disabled(model.transformer):
                return model(x_t, t, prompt_embeds, pooled)

    def dpo_step(self, batch: dict) -> dict:
        b = batch["latent_w"].shape[0]
        x0 = torch.cat([batch["latent_w"], batch["latent_l"]])  # (2B, C, h, w) winners, then losers
        t, eps = self.draw_noise(batch)
        t, eps = torch.cat([t, t]), torch.cat([eps, eps])  # a pair shares t and noise
        x_t = flow.add_noise(x0, eps, t)
        embeds = torch.cat([batch["prompt_embeds"]] * 2)  # (2B, L, D)
        pooled = torch.cat([batch["pooled"]] * 2)  # (2B, P)
        ref_err = velocity_errors(self.reference_velocity(x_t, t, embeds, pooled), x0, eps)  # (2B,)
        model_err = velocity_errors(self.engines.model(x_t, t, embeds, pooled), x0, eps)  # (2B,)
        loss, metrics = dpo_loss(model_err[:b], model_err[b:], ref_err[:b], ref_err[b:], self.cfg.dpo.beta)
        if faults.armed("nan_loss", self.step + 1):
            loss = loss * float("nan")
        self.engines.model.backward(loss)
        self.engines.model.step()
        return metrics

    def train_step(self, micro_batches: list[dict], step: int) -> dict:
        """One optimizer step over `grad_accum` micro-batches of pairs, after `step` others."""
        self.step = step
        metrics = [self.dpo_step(batch) for batch in micro_batches]
        out = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        # DeepSpeed skips a step whose global gradient norm is not finite, on every rank alike.
        out["health/step_skipped"] = float(not self.engines.model.was_step_applied())
        return out
