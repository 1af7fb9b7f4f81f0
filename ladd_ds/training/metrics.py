"""Metric sinks: TensorBoard (RUN_DIR/tb/) and RUN_DIR/metrics.jsonl on the main rank only.

Other ranks get a NullLogger, so the training code never branches on the rank to log.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from ladd_ds.core.errors import reporting_full_disk


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_images(self, step: int, images: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MetricLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        """`purge_step`: the first step this run logs when it continues a run directory; the
        events an earlier run wrote at that step or later are hidden in TensorBoard."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        # json cannot hold NaN/inf portably; keep them visible as strings.
        safe = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        with reporting_full_disk(self.path, "metrics"), self.path.open("a") as f:
            f.write(json.dumps(safe) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_images(self, step: int, images: dict) -> None:
        """images: tag -> (3, H, W) uint8 tensor."""
        if self.writer is not None:
            for tag, image in images.items():
                self.writer.add_image(tag, image, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def to_floats(metrics: dict) -> dict[str, float]:
    """Metrics as Python floats; tensor values (a step's losses, on the device) are read in one
    copy to the host, the only synchronisation with the device a logging step needs."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        out.update(zip(keys, torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()))
    return out


class StepTimer:
    """Wall time of the latest training step, read on logging steps. On a GPU the step's work is
    only queued when `stop` runs (nothing waits for the device between logging steps), so CUDA
    events mark its start and end on the stream and `seconds` waits for the end event."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._start = self._end = None
        self._elapsed = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._elapsed = time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0  # ms -> s
        return self._elapsed


def truncate_after(path: Path, step: int) -> None:
    """Drop metrics.jsonl records past `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
