"""The LADD method as small, overridable steps on three DeepSpeed engines.

Per iteration (docs/method.md, section 2): for every micro-batch a generator step (student update
through the frozen teacher and frozen heads), then for every micro-batch a discriminator step
(heads update on re-noised real and fake latents). Variants override a step rather than copying
the loop: image-conditioned LADD (inpainting, editing; ladd/conditioned.py) overrides
`model_input`, through which every student and teacher call builds its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladd_ds.config import Config
from ladd_ds.core import flow
from ladd_ds.core.errors import InputError
from ladd_ds.core.noise import (
    per_sample_generators,
    randn_like_per_sample,
    randn_per_sample,
    to_device,
)
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.loader import batch_to_device
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed import faults
from ladd_ds.ladd import losses


@dataclass
class Noise:
    """The randomness of one LADD step for a micro-batch, drawn per sample (see ladd.noise)."""

    t_student: torch.Tensor  # (B,)
    eps_student: torch.Tensor  # (B, C, H, W)
    t_fake: torch.Tensor  # (B,) re-noising level of the student output
    eps_fake: torch.Tensor  # (B, C, H, W)
    t_real: torch.Tensor  # (B,) re-noising level of the real latents (D step)
    eps_real: torch.Tensor  # (B, C, H, W)


@dataclass
class Fakes:
    """What the G step made of a micro-batch, reused by its D step (ladd.reuse_fakes)."""

    x0: torch.Tensor  # (B, C, H, W) the student's clean estimate, detached
    # The teacher's tapped tokens of its re-noised version (K x (B, D, h, w), detached): the D step
    # re-noises the same x0 with the same noise and level, so the teacher would compute them again.
    features: list[torch.Tensor] | None = None


def _zero_stage(engine) -> int:
    """An engine's ZeRO stage; 0 for a plain module (evaluation/bench_step's engines)."""
    stage = getattr(engine, "zero_optimization_stage", None)
    return stage() if callable(stage) else 0


class LADDSteps:
    """Holds the engines and the step functions; no data, logging or checkpoint concerns."""

    # Batch columns that condition the transformer besides the text (image-conditioned variants):
    # the D step's 2B batch of reals and fakes repeats them like the text.
    condition_columns: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: Config,
        engines,
        *,
        taps: list[int],
        device: torch.device,
        ema=None,
        distill_cfg: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """`distill_cfg`: guidance scale of the distillation target (resolved from ladd.distill_cfg);
        `negative`: the empty prompt's (L, D) and (P,) conditioning, needed when it is above 1."""
        if cfg.ladd.distill_weight > 0 and distill_cfg != 1.0 and negative is None:
            raise ValueError("a guided distillation target (ladd.distill_cfg > 1) needs the empty prompt's conditioning")
        self.cfg = cfg
        self.engines = engines
        self.taps = taps
        self.device = device
        self.dtype = dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")
        self.ema = ema
        self.distill_cfg = distill_cfg
        self.negative = None if negative is None else tuple(x.to(device=device, dtype=self.dtype) for x in negative)
        self.step = 0
        # With the distillation loss every teacher call is one full pass (tapped tokens and
        # velocity): the same modules in the same order each time, so ZeRO-3's prefetch trace
        # stays valid, and the G step's pass gives the distillation target's velocity too.
        self.full_teacher_pass = cfg.ladd.distill_weight > 0
        # A guided target's empty-prompt pass rides in the G step's teacher call (2B batch) on a
        # ZeRO-3 teacher: a separate call between that call's forward and backward would reset
        # ZeRO-3's prefetch trace every step. It costs the teacher's input-gradient pass on the
        # empty-prompt half too (its gradient is zero), so a replicated teacher keeps two calls.
        self.guidance_in_one_call = engines is not None and _zero_stage(engines.teacher) >= 3
        self.timesteps = flow.StudentTimesteps(
            cfg.ladd.student_timesteps, cfg.ladd.student_probs, cfg.ladd.warmup_probs, cfg.ladd.warmup_steps
        )

    def to_device(self, batch: dict) -> dict:
        return batch_to_device(batch, self.device, self.dtype)

    def model_input(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """The transformer input for the noisy latent x (B, C, H, W) of `batch`'s samples; text-to-
        image: x itself. Image-conditioned variants add their condition channels."""
        return x

    def draw_noise(self, batch: dict) -> Noise:
        x0 = batch["latent"]
        ids = batch["sample_id"]  # (B,) on the host (batch_to_device leaves it there)
        seed, step, ladd = self.cfg.run.seed, self.step, self.cfg.ladd
        g = per_sample_generators(ids, seed=seed, step=step, purpose="student")
        probs = self.timesteps.probs_at(step)
        idx = torch.stack([torch.multinomial(probs, 1, generator=gi)[0] for gi in g])
        t_student = self.timesteps.timesteps[idx]
        eps_student = randn_like_per_sample(x0, g)
        renoise = {}
        for which in ("fake", "real"):
            g = per_sample_generators(ids, seed=seed, step=step, purpose=f"renoise_{which}")
            t = torch.sigmoid(ladd.renoise_m + ladd.renoise_s * randn_per_sample(g))
            renoise[which] = (t, randn_like_per_sample(x0, g))
        as_t = lambda t: to_device(t, x0.device, torch.float32)  # noqa: E731  t stays fp32 (flow.add_noise)
        return Noise(
            t_student=as_t(t_student),
            eps_student=eps_student,
            t_fake=as_t(renoise["fake"][0]),
            eps_fake=renoise["fake"][1],
            t_real=as_t(renoise["real"][0]),
            eps_real=renoise["real"][1],
        )

    def student_x0(self, batch: dict, noise: Noise) -> torch.Tensor:
        """Student's one-step clean estimate from x_{t_s} (LADD: t_s from the discrete set)."""
        x_ts = flow.add_noise(batch["latent"], noise.eps_student, noise.t_student)
        v = self.engines.student(self.model_input(x_ts, batch), noise.t_student, batch["prompt_embeds"], batch["pooled"])
        return flow.x0_from_velocity(x_ts, v, noise.t_student)  # (B, C, H, W)

    def teacher_pass(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The teacher's tapped tokens K x (B, D, h, w) of x at t with the conditioning `cond`, and its
        velocity (B, C, H, W) when every call is a full pass (`full_teacher_pass`), else None."""
        # `.module`: the engine's own backward hook raises for an optimizer-less engine inside a
        # graph the student backpropagates through (docs/method.md, section 7).
        out = self.engines.teacher.module(
            self.model_input(x, cond), t, cond["prompt_embeds"], cond["pooled"], taps=self.taps, velocity=self.full_teacher_pass
        )
        return out if self.full_teacher_pass else (out, None)

    def guided_teacher_pass(
        self, x: torch.Tensor, t: torch.Tensor, batch: dict
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """`teacher_pass` of x with the batch's prompts and, in the same call, of x detached with the
        empty prompt: the tapped tokens and velocity of the first half, and the empty prompt's
        velocity (B, C, H, W), detached (it only enters the no-grad guided target)."""
        b = x.shape[0]
        neg_embeds, neg_pooled = self.negative_like(batch)
        both = {k: torch.cat([batch[k], batch[k]]) for k in self.condition_columns}
        both["prompt_embeds"] = torch.cat([batch["prompt_embeds"], neg_embeds])  # (2B, L, D)
        both["pooled"] = torch.cat([batch["pooled"], neg_pooled])  # (2B, P)
        features, v = self.teacher_pass(torch.cat([x, x.detach()]), torch.cat([t, t]), both)
        return [f[:b] for f in features], v[:b], v[b:].detach()

    def teacher_features(self, x: torch.Tensor, t: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        return self.teacher_pass(x, t, batch)[0]

    def negative_like(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's conditioning for every sample of `batch`: (B, L, D) and (B, P)."""
        embeds, pooled = self.negative
        b, length, width = batch["prompt_embeds"].shape
        if embeds.shape != (length, width):
            raise InputError(
                f"the data's negative prompt conditioning has shape {tuple(embeds.shape)}, its prompts "
                f"{(length, width)}: the data root mixes datasets of different text encoders or "
                "text.max_sequence_length; regenerate it with one `ladd-ds synth` run"
            )
        return embeds.expand(b, -1, -1), pooled.expand(b, -1)

    @torch.no_grad()
    def distill_target(
        self,
        x_hat: torch.Tensor,
        t: torch.Tensor,
        batch: dict,
        v_cond: torch.Tensor | None = None,
        v_uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The teacher's x0 on the re-noised student output, with classifier-free guidance at
        `distill_cfg`: v = v(empty) + w (v(prompt) - v(empty)), the same guidance the data was
        generated with, so that the distillation and the adversarial loss pull the same way.
        `v_cond`, `v_uncond`: the teacher's velocities with the batch's prompts and with the empty
        prompt, when the caller has them (the G step's full pass; `guided_teacher_pass`); each one
        missing is one more full pass."""
        teacher = self.engines.teacher.module
        x_in = self.model_input(x_hat, batch)  # guidance drops the text only; the image condition stays
        if v_cond is None:
            _, v_cond = teacher(x_in, t, batch["prompt_embeds"], batch["pooled"], taps=self.taps, velocity=True)
        v = v_cond
        if self.distill_cfg != 1.0:
            if v_uncond is None:
                neg_embeds, neg_pooled = self.negative_like(batch)
                _, v_uncond = teacher(x_in, t, neg_embeds, neg_pooled, taps=self.taps, velocity=True)  # the same full pass
            v = v_uncond + self.distill_cfg * (v_cond - v_uncond)
        return flow.x0_from_velocity(x_hat, v, t)  # (B, C, H, W)

    def generator_step(self, batch: dict, noise: Noise) -> tuple[dict, Fakes]:
        loss, metrics, fakes = self.generator_loss(batch, noise)
        self.engines.student.backward(loss)
        for frozen in (self.engines.teacher, self.engines.heads):  # their backward was the student's
            ds.release_backward_leftovers(frozen)
        self.engines.student.step()
        return metrics, fakes

    def generator_loss(self, batch: dict, noise: Noise) -> tuple[torch.Tensor, dict, Fakes]:
        """The G step's forward: its loss (what the student backpropagates), metrics and fakes. The
        memory plan runs it on meta models to count what the step keeps for backward."""
        heads = self.engines.heads.module
        heads.requires_grad_(False)  # frozen: trainable heads break ZeRO's next head backward
        x0_hat = self.student_x0(batch, noise)
        x_hat = flow.add_noise(x0_hat, noise.eps_fake, noise.t_fake)
        v_uncond = None
        if self.distill_cfg != 1.0 and self.full_teacher_pass and self.guidance_in_one_call:
            features, v_cond, v_uncond = self.guided_teacher_pass(x_hat, noise.t_fake, batch)
        else:
            features, v_cond = self.teacher_pass(x_hat, noise.t_fake, batch)  # v_cond: None without distillation
        logits = heads(features, noise.t_fake, batch["pooled"])
        loss_adv = losses.generator_hinge_loss(logits)
        if faults.armed("nan_loss", self.step + 1):
            loss_adv = loss_adv * float("nan")
        loss = loss_adv
        metrics = {"loss/generator": loss_adv.detach()}  # device tensors: read on logging steps only
        if self.cfg.ladd.distill_weight > 0:
            x0_teacher = self.distill_target(x_hat.detach(), noise.t_fake, batch, v_cond.detach(), v_uncond)
            loss_distill = losses.distillation_loss(x0_hat, x0_teacher)
            loss = loss + self.cfg.ladd.distill_weight * loss_distill
            metrics["loss/distill"] = loss_distill.detach()
        return loss, metrics, Fakes(x0_hat.detach(), [f.detach() for f in features])

    def discriminator_step(self, batch: dict, noise: Noise, fakes: Fakes | None) -> dict:
        """Heads update on re-noised real latents and fakes. `fakes`: the G step's (ladd.reuse_fakes);
        None recomputes them with the updated student. Fakes without features go through the
        teacher with the reals, in one call on a 2B batch."""
        loss, metrics = self.discriminator_loss(batch, noise, fakes)
        self.engines.heads.backward(loss)
        self.engines.heads.step()
        return metrics

    def discriminator_loss(self, batch: dict, noise: Noise, fakes: Fakes | None) -> tuple[torch.Tensor, dict]:
        """The D step's forward: the heads' loss and metrics (counted on meta models by the plan)."""
        heads = self.engines.heads
        heads.module.requires_grad_(True)
        b = batch["latent"].shape[0]
        t_hat = torch.cat([noise.t_real, noise.t_fake])  # (2B,)
        pooled = torch.cat([batch["pooled"], batch["pooled"]])  # (2B, P)
        with torch.no_grad():
            x_real = flow.add_noise(batch["latent"], noise.eps_real, noise.t_real)
            if fakes is not None and fakes.features is not None:
                real = self.teacher_features(x_real, noise.t_real, batch)
                features = [torch.cat([r, f]) for r, f in zip(real, fakes.features)]
            else:
                fake_x0 = self.student_x0(batch, noise) if fakes is None else fakes.x0
                x_fake = flow.add_noise(fake_x0, noise.eps_fake, noise.t_fake)
                both = {k: torch.cat([batch[k], batch[k]]) for k in ("prompt_embeds", "pooled", *self.condition_columns)}
                features = self.teacher_features(torch.cat([x_real, x_fake]), t_hat, both)
        logits = heads(features, t_hat, pooled)  # K x (2B, 1, h, w)
        real_logits = [lg[:b] for lg in logits]
        fake_logits = [lg[b:] for lg in logits]
        loss = losses.discriminator_hinge_loss(real_logits, fake_logits)
        metrics = {
            "loss/discriminator": loss.detach(),
            "d/real_logit": torch.stack([lg.mean() for lg in real_logits]).mean().detach(),
            "d/fake_logit": torch.stack([lg.mean() for lg in fake_logits]).mean().detach(),
        }
        if self.cfg.ladd.r1_gamma > 0:
            # A second, small heads pass through `.module`: torch.autograd.grad on a graph built by
            # the engine's forward fires DeepSpeed's backward epilogue (deepspeed 0.19 crashes in
            # ZeRO-2's average_tensor). The penalty's gradient still reaches the heads' parameters
            # through heads.backward(loss) below.
            real_features = [f[:b].detach().requires_grad_(True) for f in features]
            r1_logits = heads.module(real_features, noise.t_real, batch["pooled"])
            penalty = losses.r1_penalty(r1_logits, real_features)
            loss = loss + 0.5 * self.cfg.ladd.r1_gamma * penalty
            metrics["loss/r1"] = penalty.detach()
        return loss, metrics

    def train_step(self, micro_batches: list[dict], step: int) -> dict:
        """One optimizer step of the student and of the heads over `grad_accum` micro-batches;
        `step` optimizer steps were done before (the noise draws and the warm-up depend on it)."""
        self.step = step
        noises = [self.draw_noise(b) for b in micro_batches]
        metrics: list[dict] = []
        fakes = []
        for batch, noise in zip(micro_batches, noises):
            m, fake = self.generator_step(batch, noise)
            metrics.append(m)
            fakes.append(fake if self.cfg.ladd.reuse_fakes else None)
        # DeepSpeed (ZeRO 1-3) skips an optimizer step whose global gradient norm is not finite,
        # on every rank alike since the norm is all-reduced; a NaN loss anywhere ends up there.
        student_applied = self.engines.student.was_step_applied()
        if student_applied:
            for i, (batch, noise) in enumerate(zip(micro_batches, noises)):
                metrics[i].update(self.discriminator_step(batch, noise, fakes[i]))
            heads_applied = self.engines.heads.was_step_applied()
        else:
            # The iteration is atomic: fakes from a step judged unhealthy do not train the heads.
            # `student_applied` is the same on every rank, so all ranks skip the same forwards.
            nan = float("nan")
            for m in metrics:
                m.update({"loss/discriminator": nan, "d/real_logit": nan, "d/fake_logit": nan})
            heads_applied = False
        ds.release_frozen(self.engines.teacher)
        if self.ema is not None and student_applied and self.ema.due(step + 1):
            self.ema.update(self.engines.student.module)
        out = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        out["health/step_skipped"] = float(not (student_applied and heads_applied))
        out["t/student_mean"] = torch.cat([n.t_student for n in noises]).mean()
        return out
