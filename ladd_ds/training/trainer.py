"""The training loop shared by every method: data, logging, checkpoints, resume and health
around a method's `train_step` (the interface: ladd_ds.training.method.Method).

`Trainer(cfg, run_dir, method)` trains the method class it is given (the CLI's is the one
ladd_ds.methods.method_for picks: LADD, its inpaint/edit variant, or DPO); a variant of a method
overrides its steps and never copies this loop.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ladd_ds.config import Config
from ladd_ds.core.errors import LaddError
from ladd_ds.core.host_memory import PeakIncrease, peak_rss_increase
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.loader import batch_to_device, build_loader, iterate_forever
from ladd_ds.data.writer import write_random_latents
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed import faults
from ladd_ds.distributed.ranks import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    is_main,
    local_world_size,
    print0,
    rank,
    world_size,
)
from ladd_ds.distributed.stop import StopRequested, StopSignals
from ladd_ds.models.attention import sdpa_context, sdpa_priority
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.build import mds_data_plan
from ladd_ds.training.convert import convert_for_world_size
from ladd_ds.training.logfile import RunLog, log_exception, log_line, logged_exceptions
from ladd_ds.training.method import Method
from ladd_ds.training.metrics import MetricLogger, NullLogger, StepTimer, to_floats, truncate_after
from ladd_ds.training.run_dir import check_run_dir, claim_run_dir, record_config


def host_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class TrainingHealthError(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps) after saving a checkpoint."""


class Trainer:
    """Loop, data, logging, checkpoints, resume and health around one `Method`."""

    def __init__(self, cfg: Config, run_dir: Path, method: type[Method], allow_change: list[str] | None = None):
        """`allow_change`: config keys (or sections) a resumed run may change although they change
        what is trained (training/run_dir.py)."""
        check_run_dir(Path(run_dir), method.kind)  # read-only, every rank: first, before the data is checked
        method.check_config(cfg)
        ds.init_distributed(cfg.deepspeed.dist_backend, cfg.health.collective_timeout_s)
        self.run_dir = Path(run_dir)
        self.lock = claim_run_dir(self.run_dir, method.kind)  # one job per run directory
        self.run_log = None
        try:
            self._setup(cfg, method, allow_change)
        except BaseException as e:
            if self.run_log is not None:
                log_exception(e)
                self.run_log.close()
            if self.lock is not None:  # a job that failed to start leaves the run directory free
                self.lock.release()
            raise

    def _setup(self, cfg: Config, method: type[Method], allow_change: list[str] | None) -> None:
        self.cfg = cfg
        self.dtype = dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")
        self.step = 0
        self._record_config(allow_change)
        # The log file from here on: a start refused before (another job's lock, a config change
        # that needs --allow-change) leaves the run directory as it was.
        found = ckpt.complete_checkpoints(self.run_dir)
        self.run_log = RunLog(self.run_dir, rank=rank(), world_size=world_size(), resume_step=found[-1][0] if found else None)
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
        self.sdpa_priority = sdpa_priority(cfg.model.attention_backend, cuda=torch.cuda.is_available())
        if is_main():
            self._write_resolved_configs()
        self._resume()
        self.logger = self._metric_logger()
        self.preview = self.method.preview()
        self.validation = self.method.validation()
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

    def _record_config(self, allow_change: list[str] | None) -> None:
        """Collective: rank 0 records the config (config.yaml at the first start, a history line at
        every start) or refuses a resume that changes what is trained; every rank raises its error."""
        error = None
        if is_main():
            latest = ckpt.latest_checkpoint(self.run_dir)
            saved = ckpt.read_trainer_state(latest) if latest is not None else {"step": 0, "world_size": world_size()}
            try:
                record_config(
                    self.run_dir,
                    self.cfg,
                    step=saved["step"],
                    world=world_size(),
                    saved_world=saved["world_size"],
                    allow_change=allow_change,
                )
            except LaddError as e:
                error = e
        error = broadcast_object(error)
        if error is not None:
            raise error

    def _write_resolved_configs(self) -> None:
        """The DeepSpeed configs this start built its engines with (they depend on the world size)."""
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
        print0(f"resumed from {path} at step {self.step}" + (" (universal checkpoint)" if self.resume_universal else ""))

    def _metric_logger(self) -> MetricLogger | NullLogger:
        """metrics.jsonl and TensorBoard on rank 0, without what an interrupted run logged after
        the step this one starts from: those steps are trained again. metrics.jsonl loses its
        records past it; TensorBoard hides the events past it (`purge_step`: a START event at
        step + 1 after which TensorBoard discards the older events of later steps), so the
        replayed steps do not show twice."""
        if not is_main():
            return NullLogger()
        # A start from step 0 replays everything an earlier attempt logged, its validation before
        # the first step (eval.at_start, logged at step 0) included.
        last_kept = self.step if self.step > 0 else -1
        truncate_after(self.run_dir / "metrics.jsonl", last_kept)
        return MetricLogger(self.run_dir, self.cfg.logging.tensorboard, purge_step=last_kept + 1)

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
                ema.load_resharded([r["ema"] for r in rank_states])

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
            self.run_dir,
            self.step,
            engines=self.method.trainable_engines(),
            rank_state=rank_state,
            trainer_state=trainer_state,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ------------------------------------------------------------------ loop

    def fit(self, max_steps: int) -> None:
        """Train to `max_steps`. SIGINT / SIGTERM stop it after the current step with a checkpoint
        (StopRequested; ladd_ds.distributed.stop)."""
        with StopSignals() as stop, logged_exceptions(reported=(TrainingHealthError, StopRequested)):  # the CLI prints them
            self._fit(max_steps, stop)

    def _fit(self, max_steps: int, stop: StopSignals) -> None:
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
        self._started = (time.monotonic(), self.step)  # for the plain log lines' ETA
        self._since_validation = time.monotonic()
        if self.validation is not None and self.step == 0 and cfg.eval.at_start:
            self._validate()  # the starting point of the curves
        while self.step < max_steps:
            faults.maybe_die("exit", self.step + 1)
            faults.maybe_die("kill", self.step + 1)
            faults.maybe_die("sigterm", self.step + 1)
            faults.maybe_die("sigint", self.step + 1)
            micro_batches = [batch_to_device(next(self.batches), ds.device(), self.dtype) for _ in range(cfg.optim.grad_accum)]
            self.last_sample_ids = torch.cat([b["sample_id"] for b in micro_batches])
            timer.start()
            with sdpa_context(self.sdpa_priority):
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
                self._log(metrics, images_per_step, timer, bar, max_steps)
            if self.preview is not None and (self.step % cfg.logging.sample_every == 0 or self.step == max_steps):
                self.logger.log_images(self.step, self.preview.grids(self.method.trained_module(), self.dtype))
            if self.validation is not None and (self.step % cfg.eval.every == 0 or self.step == max_steps):
                self._validate()
            if self.step % cfg.checkpoint.every == 0:
                last_saved = self.save()
            signum = stop.agreed()  # every rank, every step: a signal any rank got stops them all
            if signum:
                bar.close()
                path = last_saved if last_saved is not None and self.step % cfg.checkpoint.every == 0 else self.save()
                raise StopRequested(signum, self.step, path)
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

    def _validate(self) -> None:
        """Validate the student (every rank its share), log the metrics and grids, and the share
        of the wall time since the last validation that it took (val/time_share)."""
        with sdpa_context(self.sdpa_priority):
            metrics, grids = self.validation.run(self.method)
        now = time.monotonic()
        if self.step > 0:  # of the wall time since the previous validation (or the loop's start)
            metrics["val/time_share"] = metrics["val/seconds"] / max(now - self._since_validation, 1e-9)
        self._since_validation = now
        if is_main():
            fds = ", ".join(f"{k.removeprefix('val/')} {number(v)}" for k, v in metrics.items() if k.count("/") == 2)
            print0(f"step {self.step}: validation {fds} ({metrics['val/seconds']:.1f} s)")
        self.logger.log(self.step, metrics)
        self.logger.log_images(self.step, grids)

    def _log(self, metrics: dict, images_per_step: int, timer: StepTimer, bar, max_steps: int) -> None:
        """A logging step: the only place the step's metrics (device tensors) are read on the host,
        all in one copy, then averaged over ranks."""
        metrics = all_reduce_mean({**to_floats(metrics), **self._perf_metrics(images_per_step, timer.seconds())})
        if is_main():
            bar.set_postfix({label: f"{metrics[key]:.3f}" for label, key in self.method.postfix_metrics.items()})
            line = self._plain_line(metrics, max_steps)
            # The bar shows the losses on a terminal; a job's output file (or no bar) gets lines.
            if self.cfg.logging.progress_bar and sys.stdout.isatty():
                log_line(line)
            else:
                print0(line)
        self.logger.log(self.step, metrics)

    def _plain_line(self, metrics: dict, max_steps: int) -> str:
        """`step 20/100 | loss/generator 0.693 | loss/discriminator 1.386 | 3.2 img/s | eta 5m12s`"""
        parts = [f"step {self.step}/{max_steps}"]
        parts += [f"{key} {number(metrics[key])}" for key in self.method.postfix_metrics.values() if key in metrics]
        parts.append(f"{metrics['throughput/img_per_s']:.3g} img/s")
        start_time, start_step = self._started
        done = self.step - start_step
        if done > 0:
            parts.append(f"eta {duration((time.monotonic() - start_time) / done * (max_steps - self.step))}")
        return " | ".join(parts)

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
        if self.lock is not None:
            self.lock.release()
        self.run_log.close()


def number(value: float) -> str:
    """0.6931, 12.50, 1.234e-05: four decimals where they show the value, else exponent form"""
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"


def duration(seconds: float) -> str:
    """5s, 5m12s, 2h05m"""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
