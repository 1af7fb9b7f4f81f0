"""The training loop shared by every method: data, logging, checkpoints, resume and health
around a method's `train_step` (the interface: ladd_ds.training.method.Method).

`Trainer(cfg, run_dir, LADDMethod)` trains LADD, `Trainer(cfg, run_dir, DPOMethod)` DPO; a
variant of a method overrides its steps and never copies this loop.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch
from tqdm import tqdm

from ladd_ds.config import Config, save_config
from ladd_ds.core.host_memory import PeakIncrease, peak_rss_increase
from ladd_ds.data.loader import batch_to_device, build_loader, iterate_forever
from ladd_ds.data.writer import write_random_latents
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed import faults
from ladd_ds.distributed.ranks import (
    all_reduce_mean,
    barrier,
    is_main,
    local_world_size,
    print0,
    rank,
    world_size,
)
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.build import mds_data_plan
from ladd_ds.training.convert import convert_for_world_size
from ladd_ds.training.method import Method
from ladd_ds.training.metrics import MetricLogger, NullLogger, StepTimer, to_floats, truncate_after


def host_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class TrainingHealthError(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps) after saving a checkpoint."""


class Trainer:
    """Loop, data, logging, checkpoints, resume and health around one `Method`."""

    def __init__(self, cfg: Config, run_dir: Path, method: type[Method]):
        method.check_config(cfg)
        ds.init_distributed(cfg.deepspeed.dist_backend, cfg.health.collective_timeout_s)
        self.run_dir = Path(run_dir)
        ckpt.check_run_dir(self.run_dir, method.kind)  # before anything is written into it
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        self.step = 0
        self.loader = self._build_loader(method)

        self.ds_configs = method.ds_configs(cfg, world_size())
        self.resume_from, self.resume_universal = self._plan_resume(method.trainable)
        self.method = method.build(cfg, self.ds_configs)
        print0(f"engines built; host peak RSS of rank 0 so far: {host_peak_rss_gib():.2f} GiB")
        print0(
            f"world size {world_size()}, {local_world_size()} ranks per node; ZeRO stages: "
            + ", ".join(f"{k} {ds.zero_stage(v)}" for k, v in self.ds_configs.items())
        )

        self.skipped_steps = 0  # steps whose update DeepSpeed skipped (non-finite norm)
        self.consecutive_skips = 0
        self.logger = MetricLogger(self.run_dir, cfg.logging.tensorboard) if is_main() else NullLogger()
        if is_main():
            self._write_resolved_configs()
        self._resume()
        self.preview = self.method.preview()
        self.batches = iterate_forever(self.loader)
        self.last_sample_ids = torch.zeros(0, dtype=torch.int64)  # on the host (batch_to_device)

    # ------------------------------------------------------------------ setup

    def _build_loader(self, method: type[Method]):
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
                    text_len=rl.text_len,
                    text_dim=rl.text_dim,
                    pooled_dim=rl.pooled_dim,
                    seed=self.cfg.run.seed,
                    layout=method.data_layout(self.cfg),
                )
            barrier()
        # The buckets check_config kept (data.drop_small_buckets); None: every bucket, or not local.
        plan = mds_data_plan(self.cfg, method.data_layout(self.cfg), world_size())
        return build_loader(
            path,
            data.micro_batch_size,
            seed=self.cfg.run.seed,
            num_workers=data.num_workers,
            dtype=self.dtype,
            local_cache=data.cache_dir,
            remote_buckets=data.buckets,
            layout=method.data_layout(self.cfg),
            buckets=(plan.buckets or None) if plan is not None else None,
            shared_memory_cleanup=data.shared_memory_cleanup,
        )

    def _write_resolved_configs(self) -> None:
        save_config(self.cfg, self.run_dir / "config.yaml")
        for name, ds_config in self.ds_configs.items():
            (self.run_dir / f"ds_config_{name}.json").write_text(json.dumps(ds_config, indent=2))

    def _plan_resume(self, trainable: tuple[str, ...]) -> tuple[Path | None, bool]:
        """Newest complete checkpoint, and whether it needs the universal format (it was written
        with another world size). Decided before the engines exist: loading a universal
        checkpoint is an engine config setting."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return None, False
        saved_world = ckpt.read_trainer_state(path)["world_size"]
        if saved_world == world_size():
            return path, False
        print0(f"{path} was written by {saved_world} ranks, this run has {world_size()}: it loads as a universal checkpoint")
        convert_for_world_size(path, list(trainable))
        for name in trainable:
            self.ds_configs[name]["checkpoint"] = {"load_universal": True}
        return path, True

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        with peak_rss_increase() as engines_memory:
            state = ckpt.load_checkpoint(path, self.method.trainable_engines(), universal=self.resume_universal)
        with peak_rss_increase() as rank_memory:
            self._load_rank_state(path, state)
        self._report_resume_memory(path, engines_memory, rank_memory)
        if is_main():
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
        print0(f"resumed from {path} at step {self.step}" + (" (universal checkpoint)" if self.resume_universal else ""))

    def _load_rank_state(self, path: Path, state: dict) -> None:
        """Counters, data position and EMA. Each rank reads its own rank file; after a world-size
        change, the old ranks' files memory-mapped, of which only this rank's EMA share is read."""
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        same_world = ckpt.saved_world_size(path) == world_size()
        rank_states = [ckpt.read_rank_state(path, rank())] if same_world else ckpt.read_rank_states(path)
        # Streaming's loader state is global (epoch, samples consumed by all ranks), so any rank's
        # copy restores the position; it is exact when the global batch size is unchanged.
        self.loader.load_state_dict(rank_states[0]["loader"])
        ema = self.method.ema
        if ema is not None:
            if any("ema" not in r for r in rank_states):
                raise RuntimeError(f"checkpoint {path} has no EMA state but optim.ema_decay > 0")
            if same_world:
                ema.load_state_dict(rank_states[0]["ema"])
            else:
                ema.load_resharded(self.method.trained_module(), [r["ema"]["shadow"] for r in rank_states])

    def _report_resume_memory(self, path: Path, engines: PeakIncrease, rank_state: PeakIncrease) -> None:
        """Each rank prints how far resuming raised its host memory, next to the bytes of the
        checkpoint files that are its share and of the whole checkpoint."""
        if engines.increase is None or rank_state.increase is None:
            return  # the peak cannot be reset here
        peak = max(engines.increase, rank_state.before + rank_state.increase - engines.before)
        share, total = ckpt.checkpoint_bytes(path, rank())
        mib = 2**20
        print(
            f"rank {rank()}: resume raised host memory by {peak / mib:.1f} MiB at its peak (engines "
            f"{engines.increase / mib:.1f} MiB, rank state {rank_state.increase / mib:.1f} MiB); checkpoint files: "
            f"this rank's share {share / mib:.1f} MiB, all ranks {total / mib:.1f} MiB",
            flush=True,
        )

    def save(self) -> Path:
        rank_state = {"loader": self.loader.state_dict(), "step": self.step, "last_sample_ids": self.last_sample_ids.tolist()}
        if self.method.ema is not None:
            rank_state["ema"] = self.method.ema.state_dict()
        trainer_state = {
            "step": self.step,
            "world_size": world_size(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "trainer": self.method.kind,
            **self.method.extra_state(),
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.method.trainable_engines(), rank_state, trainer_state, self.cfg.checkpoint.keep_last
        )

    # ------------------------------------------------------------------ loop

    def fit(self, max_steps: int) -> None:
        cfg = self.cfg
        images_per_step = cfg.data.micro_batch_size * cfg.optim.grad_accum * world_size()
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc=self.method.progress_desc,
            disable=not (is_main() and cfg.logging.progress_bar),
            dynamic_ncols=True,
        )
        last_saved = None
        timer = StepTimer()
        while self.step < max_steps:
            faults.maybe_die("exit", self.step + 1)
            faults.maybe_die("kill", self.step + 1)
            micro_batches = [batch_to_device(next(self.batches), ds.device(), self.dtype) for _ in range(cfg.optim.grad_accum)]
            self.last_sample_ids = torch.cat([b["sample_id"] for b in micro_batches])
            timer.start()
            metrics = self.method.train_step(micro_batches, self.step)
            timer.stop()
            self.step += 1
            bar.update(1)
            skipped = metrics.pop("health/step_skipped") > 0
            self.skipped_steps += skipped
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            metrics["health/skipped_steps"] = float(self.skipped_steps)
            if skipped:
                print0(f"step {self.step}: non-finite loss or gradient norm, update skipped on every rank")
            if self.step % cfg.logging.every == 0 or self.step == max_steps or skipped:
                self._log(metrics, images_per_step, timer, bar)
            if self.preview is not None and (self.step % cfg.logging.sample_every == 0 or self.step == max_steps):
                self.logger.log_images(self.step, self.preview.grids(self.method.trained_module(), self.dtype))
            if self.step % cfg.checkpoint.every == 0:
                last_saved = self.save()
            if self.consecutive_skips >= cfg.health.max_consecutive_skips:
                bar.close()
                path = self.save()
                raise TrainingHealthError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                    f"(health.max_consecutive_skips = {cfg.health.max_consecutive_skips}); stopped at step "
                    f"{self.step} with a checkpoint in {path}. Lower the learning rate or check the data, "
                    "then run the same command to resume."
                )
        bar.close()
        if last_saved is None or self.step % cfg.checkpoint.every != 0:
            self.save()  # a run that reaches max_steps always ends with a checkpoint

    def _log(self, metrics: dict, images_per_step: int, timer: StepTimer, bar) -> None:
        """A logging step: the only place the step's metrics (device tensors) are read on the host,
        all in one copy, then averaged over ranks."""
        metrics = all_reduce_mean({**to_floats(metrics), **self._perf_metrics(images_per_step, timer.seconds())})
        if is_main():
            bar.set_postfix({label: f"{metrics[key]:.3f}" for label, key in self.method.postfix_metrics.items()})
        self.logger.log(self.step, metrics)

    def _perf_metrics(self, images_per_step: int, elapsed: float) -> dict:
        out = {"throughput/img_per_s": images_per_step / elapsed, "time/step_s": elapsed}
        for name, engine in self.method.trainable_engines().items():
            out[f"lr/{name}"] = engine.get_lr()[0]
            norm = engine.get_global_grad_norm()
            if norm is not None and math.isfinite(float(norm)):
                out[f"grad_norm/{name}"] = float(norm)
        if torch.cuda.is_available():
            out["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # Peak resident host memory of this process, averaged over ranks.
        out["memory/host_peak_rss_gib"] = host_peak_rss_gib()
        return out

    def close(self) -> None:
        self.logger.close()
