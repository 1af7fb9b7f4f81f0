"""Fault injection for the fault-tolerance tests (never set in normal runs).

LADD_DS_INJECT_FAULTS="KIND@STEP[:RANK],..." with KIND one of
  nan_loss      multiply the generator loss by NaN in the iteration that produces STEP
  exit          leave the process with exit code 0 before that iteration (a rank that vanishes)
  kill          SIGKILL this process before that iteration
  kill_in_save  SIGKILL this process while writing the checkpoint of STEP, after the engines
                wrote their files and before the checkpoint is committed
  kill_in_finalize  SIGKILL `synth` / `encode` while finalizing, before the index of the STEP-th
                bucket is written
  sigterm       send SIGTERM to this process before that iteration (as SLURM does before it kills
                a job; the run stops after that iteration with a checkpoint)
  sigint        the same with SIGINT (Ctrl-C)
  enospc_in_save  a full disk (OSError ENOSPC) while this rank writes the checkpoint of STEP
RANK limits the fault to one global rank (default: every rank).
"""

from __future__ import annotations

import errno
import functools
import os
import signal

from ladd_ds.core.errors import InputError
from ladd_ds.distributed.ranks import rank

ENV = "LADD_DS_INJECT_FAULTS"
KINDS = ("nan_loss", "exit", "kill", "kill_in_save", "kill_in_finalize", "sigterm", "sigint", "enospc_in_save")


@functools.lru_cache(maxsize=8)
def _parse(text: str) -> list[tuple[str, int, int | None]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            kind, rest = item.split("@")
            step_text, _, rank_text = rest.partition(":")
            faults.append((kind, int(step_text), int(rank_text) if rank_text else None))
        except ValueError:
            raise InputError(f"{ENV}: cannot parse {item!r}; expected KIND@STEP[:RANK]") from None
        if kind not in KINDS:
            raise InputError(f"{ENV}: unknown fault {kind!r} (known: {', '.join(KINDS)})")
    return tuple(faults)


def armed(kind: str, step: int) -> bool:
    """True when fault `kind` is injected at `step` on this rank."""
    return any(k == kind and s == step and (r is None or r == rank()) for k, s, r in _parse(os.environ.get(ENV, "")))


def maybe_die(kind: str, step: int) -> None:
    if not armed(kind, step):
        return
    print(f"[fault injection] {kind} at step {step} on rank {rank()}", flush=True)
    if kind == "enospc_in_save":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    if kind in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        return
    if kind == "exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)
