"""The LADD trainer: student, frozen teacher-as-discriminator and heads on three DeepSpeed engines.

Each iteration (DESIGN.md section 1): for every micro-batch a generator step (student update
through the frozen teacher and frozen heads), then for every micro-batch a discriminator step
(heads update on re-noised real and fake latents). Variants (editing, inpainting, DPO) override
`generator_step`, `discriminator_step` or `train_step` rather than copying the loop.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ladd_ds.config import Config, save_config
from ladd_ds.data.loader import build_loader, iterate_forever
from ladd_ds.data.writer import write_random_latents
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import all_reduce_mean, barrier, is_main, print0, world_size
from ladd_ds.ema import ShardedEMA
from ladd_ds.ladd import flow, losses
from ladd_ds.ladd.noise import per_sample_generators, randn_like_per_sample, randn_per_sample
from ladd_ds.models.flow_model import FlowModel
from ladd_ds.models.heads import DiscriminatorHeads
from ladd_ds.models.registry import build_transformer, count_parameters, resolve_model_config
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.metrics import MetricLogger, NullLogger, truncate_after


@dataclass
class Noise:
    """The randomness of one LADD step for a micro-batch, drawn per sample (see ladd.noise)."""

    t_student: torch.Tensor  # (B,)
    eps_student: torch.Tensor  # (B, C, H, W)
    t_fake: torch.Tensor  # (B,) re-noising level of the student output
    eps_fake: torch.Tensor  # (B, C, H, W)
    t_real: torch.Tensor  # (B,) re-noising level of the real latents (D step)
    eps_real: torch.Tensor  # (B, C, H, W)


def resolve_taps(taps: list[int] | None, num_blocks: int) -> list[int]:
    if taps is None:
        return list(range(num_blocks))
    bad = [i for i in taps if i >= num_blocks]
    if bad:
        raise ValueError(f"discriminator.taps: blocks {bad} do not exist (the teacher has {num_blocks} blocks, 0..{num_blocks - 1})")
    return sorted(taps)


def build_models(cfg: Config, device: str = "cpu") -> tuple[FlowModel, FlowModel, DiscriminatorHeads, list[int]]:
    """Teacher, student (a copy of the teacher unless model.student names its own) and heads."""
    teacher = FlowModel(build_transformer(cfg.model.teacher, seed=cfg.run.seed, device=device))
    if cfg.model.student is None:
        student = copy.deepcopy(teacher)
    else:
        student = FlowModel(build_transformer(cfg.model.student, seed=cfg.run.seed + 1, device=device))
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


def build_ds_configs(cfg: Config, world: int) -> dict[str, dict]:
    common = dict(
        micro_batch_size=cfg.data.micro_batch_size,
        grad_accum=cfg.optim.grad_accum,
        world_size=world,
        precision=cfg.deepspeed.precision,
    )
    d = cfg.deepspeed
    return {
        "student": ds.fill_ds_config(ds.load_template(d.student_config, "deepspeed.student_config"), grad_clip=cfg.optim.grad_clip, **common),
        "heads": ds.fill_ds_config(ds.load_template(d.heads_config, "deepspeed.heads_config"), grad_clip=cfg.optim.grad_clip, **common),
        "teacher": ds.fill_ds_config(ds.load_template(d.teacher_config, "deepspeed.teacher_config"), **common),
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


class LADDTrainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.step = 0
        self.device = ds.device()
        self.dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        self.timesteps = flow.StudentTimesteps(
            cfg.ladd.student_timesteps, cfg.ladd.student_probs, cfg.ladd.warmup_probs, cfg.ladd.warmup_steps
        )
        check_data_matches_model(cfg)
        ds.init_distributed(cfg.deepspeed.dist_backend)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.loader = self._build_loader()
        teacher, student, heads, self.taps = build_models(cfg)
        self.ds_configs = build_ds_configs(cfg, world_size())
        self.engines = ds.build_engines(student, teacher, heads, self.ds_configs, cfg.optim)
        self.ema = ShardedEMA(self.engines.student.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.logger = MetricLogger(self.run_dir, cfg.logging.tensorboard) if is_main() else NullLogger()
        if is_main():
            self._write_resolved_configs()
        self._resume()
        self.batches = iterate_forever(self.loader)

    # ------------------------------------------------------------------ setup

    def _build_loader(self):
        data = self.cfg.data
        path = data.path
        if data.source == "random_latents":
            rl = data.random_latents
            path = str(self.run_dir / "data" / "random_latents")
            if is_main():
                write_random_latents(
                    path,
                    num_samples=rl.num_samples,
                    latent_shape=(rl.latent_channels, rl.height, rl.width),
                    text_len=(rl.text_len_min, rl.text_len_max),
                    text_dim=rl.text_dim,
                    pooled_dim=rl.pooled_dim,
                    seed=self.cfg.run.seed,
                )
            barrier()
        return build_loader(
            path,
            data.micro_batch_size,
            seed=self.cfg.run.seed,
            num_workers=data.num_workers,
            dtype=self.dtype,
            text_len=data.text_len,
        )

    def _write_resolved_configs(self) -> None:
        import json

        save_config(self.cfg, self.run_dir / "config.yaml")
        for name, ds_config in self.ds_configs.items():
            (self.run_dir / f"ds_config_{name}.json").write_text(json.dumps(ds_config, indent=2))

    def _trainable_engines(self) -> dict:
        return {"student": self.engines.student, "heads": self.engines.heads}

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return
        state, rank_state = ckpt.load_checkpoint(path, self._trainable_engines())
        self.step = int(state["step"])
        self.loader.load_state_dict(rank_state["loader"])
        if self.ema is not None:
            if "ema" not in rank_state:
                raise RuntimeError(f"checkpoint {path} has no EMA state but optim.ema_decay > 0")
            self.ema.load_state_dict(rank_state["ema"])
        if is_main():
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
        print0(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        rank_state = {"loader": self.loader.state_dict(), "step": self.step}
        if self.ema is not None:
            rank_state["ema"] = self.ema.state_dict()
        trainer_state = {"step": self.step, "world_size": world_size()}
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self._trainable_engines(), rank_state, trainer_state, self.cfg.checkpoint.keep_last
        )

    # ------------------------------------------------------------------ LADD steps

    def to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            v = v.to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    def draw_noise(self, batch: dict) -> Noise:
        x0 = batch["latent"]
        ids = batch["sample_id"].cpu()
        seed, step, ladd = self.cfg.run.seed, self.step, self.cfg.ladd
        g = per_sample_generators(ids, seed, step, "student")
        probs = self.timesteps.probs_at(step)
        idx = torch.stack([torch.multinomial(probs, 1, generator=gi)[0] for gi in g])
        t_student = self.timesteps.timesteps[idx]
        eps_student = randn_like_per_sample(x0, g)
        renoise = {}
        for which in ("fake", "real"):
            g = per_sample_generators(ids, seed, step, f"renoise_{which}")
            t = torch.sigmoid(ladd.renoise_m + ladd.renoise_s * randn_per_sample(g))
            renoise[which] = (t, randn_like_per_sample(x0, g))
        as_t = lambda t: t.to(device=x0.device, dtype=x0.dtype)  # noqa: E731
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
        v = self.engines.student(x_ts, noise.t_student, batch["prompt_embeds"], batch["pooled"])
        return flow.x0_from_velocity(x_ts, v, noise.t_student)  # (B, C, H, W)

    def teacher_features(self, x: torch.Tensor, t: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        # `.module`: the engine's own backward hook raises for an optimizer-less engine inside a
        # graph the student backpropagates through (DESIGN.md section 3).
        return self.engines.teacher.module(x, t, batch["prompt_embeds"], batch["pooled"], taps=self.taps)

    def generator_step(self, batch: dict, noise: Noise) -> tuple[dict, torch.Tensor]:
        heads = self.engines.heads.module
        heads.requires_grad_(False)  # frozen: trainable heads break ZeRO's next head backward
        x0_hat = self.student_x0(batch, noise)
        x_hat = flow.add_noise(x0_hat, noise.eps_fake, noise.t_fake)
        logits = heads(self.teacher_features(x_hat, noise.t_fake, batch), noise.t_fake, batch["pooled"])
        loss_adv = losses.generator_hinge_loss(logits)
        loss = loss_adv
        metrics = {"loss/generator": loss_adv.item()}
        if self.cfg.ladd.distill_weight > 0:
            with torch.no_grad():
                v_teacher = self.engines.teacher.module(x_hat, noise.t_fake, batch["prompt_embeds"], batch["pooled"])
                x0_teacher = flow.x0_from_velocity(x_hat, v_teacher, noise.t_fake)
            loss_distill = losses.distillation_loss(x0_hat, x0_teacher)
            loss = loss + self.cfg.ladd.distill_weight * loss_distill
            metrics["loss/distill"] = loss_distill.item()
        self.engines.student.backward(loss)
        self.engines.student.step()
        return metrics, x0_hat.detach()

    def discriminator_step(self, batch: dict, noise: Noise, fake_x0: torch.Tensor | None) -> dict:
        heads = self.engines.heads
        heads.module.requires_grad_(True)
        b = batch["latent"].shape[0]
        with torch.no_grad():
            if fake_x0 is None:  # ladd.reuse_fakes = false: fakes from the updated student
                fake_x0 = self.student_x0(batch, noise)
            x_fake = flow.add_noise(fake_x0, noise.eps_fake, noise.t_fake)
            x_real = flow.add_noise(batch["latent"], noise.eps_real, noise.t_real)
            t_hat = torch.cat([noise.t_real, noise.t_fake])  # (2B,)
            both = {k: torch.cat([batch[k], batch[k]]) for k in ("prompt_embeds", "pooled")}
            features = self.teacher_features(torch.cat([x_real, x_fake]), t_hat, both)
        logits = heads(features, t_hat, both["pooled"])  # K x (2B, 1, h, w)
        real_logits = [lg[:b] for lg in logits]
        fake_logits = [lg[b:] for lg in logits]
        loss = losses.discriminator_hinge_loss(real_logits, fake_logits)
        metrics = {
            "loss/discriminator": loss.item(),
            "d/real_logit": torch.stack([lg.mean() for lg in real_logits]).mean().item(),
            "d/fake_logit": torch.stack([lg.mean() for lg in fake_logits]).mean().item(),
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
            metrics["loss/r1"] = penalty.item()
        heads.backward(loss)
        heads.step()
        return metrics

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step of the student and of the heads over `grad_accum` micro-batches."""
        noises = [self.draw_noise(b) for b in micro_batches]
        metrics: list[dict] = []
        fakes = []
        for batch, noise in zip(micro_batches, noises):
            m, fake = self.generator_step(batch, noise)
            metrics.append(m)
            fakes.append(fake if self.cfg.ladd.reuse_fakes else None)
        for i, (batch, noise) in enumerate(zip(micro_batches, noises)):
            metrics[i].update(self.discriminator_step(batch, noise, fakes[i]))
        if self.ema is not None:
            self.ema.update(self.engines.student.module)
        out = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        out["t/student_mean"] = float(torch.cat([n.t_student for n in noises]).float().mean())
        return out

    # ------------------------------------------------------------------ loop

    def fit(self, max_steps: int) -> None:
        cfg = self.cfg
        images_per_step = cfg.data.micro_batch_size * cfg.optim.grad_accum * world_size()
        bar = tqdm(total=max_steps, initial=self.step, desc="ladd", disable=not (is_main() and cfg.logging.progress_bar), dynamic_ncols=True)
        last_saved = None
        while self.step < max_steps:
            micro_batches = [self.to_device(next(self.batches)) for _ in range(cfg.optim.grad_accum)]
            start = time.perf_counter()
            metrics = self.train_step(micro_batches)
            elapsed = time.perf_counter() - start
            self.step += 1
            bar.update(1)
            if self.step % cfg.logging.every == 0 or self.step == max_steps:
                metrics.update(self._perf_metrics(images_per_step, elapsed))
                metrics = all_reduce_mean(metrics)
                if is_main():
                    bar.set_postfix(g=f"{metrics['loss/generator']:.3f}", d=f"{metrics['loss/discriminator']:.3f}")
                self.logger.log(self.step, metrics)
            if self.step % cfg.checkpoint.every == 0:
                last_saved = self.save()
        bar.close()
        if last_saved is None or self.step % cfg.checkpoint.every != 0:
            self.save()  # a run that reaches max_steps always ends with a checkpoint

    def _perf_metrics(self, images_per_step: int, elapsed: float) -> dict:
        out = {
            "lr/student": self.engines.student.get_lr()[0],
            "lr/heads": self.engines.heads.get_lr()[0],
            "throughput/img_per_s": images_per_step / elapsed,
            "time/step_s": elapsed,
        }
        norm = self.engines.student.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            out["grad_norm/student"] = float(norm)
        if torch.cuda.is_available():
            out["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def close(self) -> None:
        self.logger.close()


def dry_run(cfg: Config, world: int) -> str:
    """Build the models on the meta device, count parameters, estimate memory; no engines."""
    check_data_matches_model(cfg)
    teacher, student, heads, taps = build_models(cfg, device="meta")
    ds_configs = build_ds_configs(cfg, world)
    bytes_param = 2 if cfg.deepspeed.precision == "bf16" else 4
    lines = [f"taps: {taps} ({len(taps)} heads)", f"world size: {world}", ""]
    lines.append(f"{'model':<10}{'params':>16}{'trainable':>16}{'ZeRO':>6}{'est. GiB/rank':>16}")
    for name, model, trainable in (("teacher", teacher, False), ("student", student, True), ("heads", heads, True)):
        n = count_parameters(model)
        stage = ds.zero_stage(ds_configs[name])
        # weights (+ fp32 grads, fp32 master and two Adam moments when trained) = 4 or 16+ bytes/param;
        # ZeRO-3 divides all of it by the world size, stage 1/2 only the optimizer part.
        weights = n * bytes_param
        extra = n * (4 + 4 * 3 if bytes_param == 2 else 4 + 8) if trainable else 0
        if stage >= 3:
            per_rank = (weights + extra) / world
        elif stage >= 1:
            per_rank = weights + extra / world
        else:
            per_rank = weights + extra
        lines.append(f"{name:<10}{n:>16,}{(n if trainable else 0):>16,}{stage:>6}{per_rank / 2**30:>16.2f}")
    lines.append("")
    lines.append("memory estimate: weights at the training precision, plus for trained models fp32 grads and")
    lines.append("Adam moments (and an fp32 master copy in bf16); activations not included.")
    return "\n".join(lines)
