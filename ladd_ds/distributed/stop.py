"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (what SLURM and the deepspeed launcher send
before they kill a job): the current step is finished, every rank saves the checkpoint together,
and the job exits with 128 + the signal's number (130, 143), as a shell reports a job killed by it.

A signal may reach only some ranks (Ctrl-C reaches the launcher's process group, `scancel` every
task, a `kill` one process), and a checkpoint is a collective: so after every step the ranks
agree, with one small all-reduce, whether any of them was signalled. It runs on a gloo group of
host tensors so that it never waits for the GPU's queued work (unmeasured on a GPU; on the CPU
ranks of the tests it is one 1-element gloo all-reduce per step).

Time limits: the deepspeed launcher, on SIGTERM, forwards it to every rank and kills them 30 s
later; SLURM waits KillWait (30 s by default) between SIGTERM and SIGKILL. A checkpoint that takes
longer needs the signal earlier: `sbatch --signal=TERM@120` (docs/training.md, "Training runs", stopping).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from ladd_ds.distributed.ranks import is_initialized, world_size

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Raised by the training loop after the checkpoint of a signalled stop is saved."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} saved. Run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """`with StopSignals() as stop:` while training. The first SIGINT or SIGTERM is remembered
    (`stop.signum`) for the loop to act on at the end of its step; a second SIGINT interrupts at
    once (KeyboardInterrupt), for a user who does not want to wait for the checkpoint. The
    previous handlers come back on exit. Handlers can only be set in the main thread; elsewhere
    (a run started from a thread) signals keep their default action."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._group = None

    def _handler(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print(f"received {signal.Signals(signum).name}: stopping after this step, with a checkpoint", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        if is_initialized() and world_size() > 1:
            # A collective: every rank builds the group at the same point of the run.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def agreed(self) -> int:
        """Collective (every rank, after every step): the signal any rank received, 0 for none.
        SIGTERM wins over SIGINT, so that every rank exits with the same code."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
