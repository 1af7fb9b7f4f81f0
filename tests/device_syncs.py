"""Counting the device synchronizations DeepSpeed's ZeRO-3 would make on a GPU, on CPU ranks.

DeepSpeed's CPU accelerator is a "synchronized device": every stream, event and synchronize call
of ZeRO-3 is skipped behind `resolves_data_dependency()` / `handles_memory_backpressure()` /
`is_synchronized_device()` (deepspeed 0.19.8, accelerator/cpu_accelerator.py), so the drains of
the CUDA path cannot be observed as they are. `install()` answers those three questions as CUDA
does and gives DeepSpeed streams and events that do nothing but record who waits on what:

- a host wait on the compute stream (the default stream's `synchronize()`, or an event recorded
  on it: partition_parameters.py `NoGatherHandle.wait` on one rank, the fetch-event back-pressure
  in partitioned_param_coordinator.py `_fetch_sub_module_impl` on several) or on the whole device
  (`get_accelerator().synchronize()`) is a drain: the host stops queuing kernels until the GPU
  has run everything queued;
- a host wait on a side stream (the all-gather stream with `overlap_comm: true`) only waits for
  that stream's copies and collectives, and is counted apart.

Events never report themselves complete (`query()` is False): the host runs ahead of the GPU,
the state a step without host syncs is in, so every back-pressure wait DeepSpeed would make is
made. A subprocess installs the model through `sitecustomize` (`sitecustomize_dir`) when
LADD_DS_TEST_SYNC_LOG names a file prefix; each rank writes its counts per training step to
PREFIX.<rank>.json at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
from pathlib import Path

ENV = "LADD_DS_TEST_SYNC_LOG"
counts: collections.Counter = collections.Counter()


class FakeStream:
    def __init__(self, kind: str):
        self.kind = kind

    def synchronize(self) -> None:
        counts[f"host waits on {self.kind} stream"] += 1

    def wait_stream(self, other) -> None:  # a device-side dependency: the host does not wait
        pass

    def query(self) -> bool:
        return False


COMPUTE = FakeStream("compute")
_current = [COMPUTE]


class FakeEvent:
    def __init__(self, *args, **kwargs):
        self.stream = None

    def record(self, stream=None) -> None:
        self.stream = stream or _current[-1]

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        counts[f"host waits on {self.stream.kind} stream"] += 1

    def wait(self, stream=None) -> None:
        pass


def drains(c: collections.Counter | dict) -> int:
    """Host waits that drain the GPU: on the compute stream or the whole device."""
    return c.get("host waits on compute stream", 0) + c.get("device synchronize", 0)


@contextlib.contextmanager
def _on(stream):
    if stream is None:
        yield
        return
    _current.append(stream)
    try:
        yield
    finally:
        _current.pop()


def install() -> None:
    """Make the CPU accelerator take DeepSpeed's stream code paths (module docstring)."""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as A

    def device_synchronize(self, device_index=None):
        counts["device synchronize"] += 1

    A.is_synchronized_device = lambda self: False
    A.resolves_data_dependency = lambda self: False
    A.handles_memory_backpressure = lambda self: False
    A.synchronize = device_synchronize
    A.Stream = property(lambda self: lambda *a, **k: FakeStream("side"))
    A.Event = property(lambda self: FakeEvent)
    A.stream = lambda self, stream: _on(stream)
    A.current_stream = lambda self, device_index=None: _current[-1]
    A.default_stream = lambda self, device_index=None: COMPUTE
    # A CPU tensor has no stream to record; DeepSpeed records one for the caching allocator only.
    torch.Tensor.record_stream = lambda self, stream: None


def install_from_env() -> None:
    """In a rank started with LADD_DS_TEST_SYNC_LOG: the model above, and the counts of every
    training step (LADDSteps.train_step) written to PREFIX.<rank>.json at exit."""
    prefix = os.environ.get(ENV)
    if not prefix:
        return
    install()
    from ladd_ds.ladd.steps import LADDSteps

    per_step: list[dict] = []
    train_step = LADDSteps.train_step

    def counted(self, *args, **kwargs):
        before = collections.Counter(counts)
        out = train_step(self, *args, **kwargs)
        per_step.append(dict(counts - before))
        return out

    def write() -> None:
        if per_step:  # not the data loader's worker processes, which inherit the environment
            Path(f"{prefix}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(per_step))

    LADDSteps.train_step = counted
    atexit.register(write)


def sitecustomize_dir(root: Path) -> Path:
    """A folder to put first on a subprocess's PYTHONPATH: its sitecustomize installs the model."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text("from tests.device_syncs import install_from_env\n\ninstall_from_env()\n")
    return root
