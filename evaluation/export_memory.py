"""Peak host memory of exporting a run's student, above the memory of the process before it.

    python -m evaluation.export_memory --run RUN_DIR [--shard-size 1MB] [--dtype bf16] [--path streamed|whole]

`streamed` is `ladd-ds export` (ladd_ds.models.sharded: one shard and one tensor at a time);
`whole` is what it did before: DeepSpeed's zero_to_fp32 materialising every fp32 tensor, a model
built around them and save_pretrained (kept here as the baseline the streamed path is measured
against). Run it in a fresh process: it resets the kernel's peak-RSS mark after the imports.

Prints one JSON line with, in bytes:
  hwm_increase     peak RSS (VmHWM) above the RSS before the export: anonymous memory plus the pages
                   of memory-mapped checkpoint files the export touched (clean file pages, which the
                   kernel drops under memory pressure: page cache, not memory the process holds)
  anon_increase    peak anonymous RSS (RssAnon, sampled every millisecond) above the RSS before:
                   the tensors and buffers the export holds
  model_fp32       the student's size in fp32; shard  the --shard-size; largest  its largest tensor
  rank_share       the largest rank's ZeRO optimizer file (fp32 master weights + Adam moments)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

import ladd_ds.distributed.engines  # noqa: F401  deepspeed and its zero_to_fp32, imported before the baseline
from ladd_ds.core.host_memory import peak_rss_increase, status_bytes
from ladd_ds.core.precision import dtype_of
from ladd_ds.distributed.engines import consolidate_zero_checkpoint
from ladd_ds.export import export_run
from ladd_ds.models.registry import resolve_model_config, transformer_from_config
from ladd_ds.models.sharded import parse_size
from ladd_ds.training.export import run_checkpoint


def status(key: str) -> int:
    value = status_bytes(key)
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {key}: this measure needs Linux")
    return value


class AnonPeak:
    """The largest RssAnon seen by a thread that samples it every `interval` seconds."""

    def __init__(self, interval: float = 0.001):
        self.peak, self.interval, self._stop = status("RssAnon"), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status("RssAnon"))


def export_whole(run_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """The export before streaming: every tensor consolidated at once, then save_pretrained."""

    cfg, checkpoint, _ = run_checkpoint(run_dir, None)
    state = consolidate_zero_checkpoint(checkpoint, "student")
    student = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    model = transformer_from_config(resolve_model_config(cfg.model.student or cfg.model.teacher), meta=True)
    model.load_state_dict(student, strict=True, assign=True)
    model.to(dtype).save_pretrained(out / "transformer", safe_serialization=True)


def measure(run_dir: Path, path: str, dtype: str, shard_size: str) -> dict:
    cfg, checkpoint, _ = run_checkpoint(run_dir, None)
    meta = transformer_from_config(resolve_model_config(cfg.model.student or cfg.model.teacher), meta=True).state_dict()
    optim_files = sorted((checkpoint / "student").glob("*optim_states.pt"))
    with tempfile.TemporaryDirectory() as tmp:
        baseline_anon = status("RssAnon")
        with peak_rss_increase() as hwm, AnonPeak() as anon:  # VmHWM is reset first: the imports' peak stays out
            if path == "streamed":
                export_run(run_dir, Path(tmp) / "out", dtype=dtype, shard_size=shard_size)
            else:
                export_whole(run_dir, Path(tmp) / "out", dtype_of(dtype, key="--dtype"))
    return {
        "path": path,
        "dtype": dtype,
        "hwm_increase": hwm.increase,  # None where the peak cannot be reset
        "anon_increase": anon.peak - baseline_anon,
        "model_fp32": sum(t.numel() for t in meta.values()) * 4,
        "shard": parse_size(shard_size),
        "largest": max(t.numel() for t in meta.values()) * 4,
        "rank_share": max(f.stat().st_size for f in optim_files),
        "world_size": len(optim_files),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--path", choices=["streamed", "whole"], default="streamed")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--shard-size", default="1MB")
    a = p.parse_args()
    print(json.dumps(measure(Path(a.run), a.path, a.dtype, a.shard_size)))


if __name__ == "__main__":
    main()
