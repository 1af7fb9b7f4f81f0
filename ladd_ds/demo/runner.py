"""How the demo runs its command stages (synth, encode, train, pairs, dpo): a `Runner`, given to
the pipeline (`run_demo(..., runner=...)`) and passed on to each stage."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


@dataclass(frozen=True)
class Runner:
    """`runner(args, log)` runs `ladd-ds ARGS` with its output in `log` and raises, showing the
    log's last lines, when the command fails.

    Without an entry point (the default) each command is a subprocess, as a user runs it. With
    one (the tests give the commands' entry point, ladd_ds.cli.main) the commands run in this
    process instead, without the ~8 s of imports each subprocess spends."""

    entry_point: Callable[[list[str]], int] | None = None

    def __call__(self, args: list[str], log: Path) -> None:
        print(f"$ ladd-ds {' '.join(args)}   (log: {log})", flush=True)
        if self.entry_point is None:
            returncode = _run_subprocess(args, log)
        else:
            returncode = _run_in_process(self.entry_point, args, log)
        if returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-20:])
            raise RuntimeError(f"ladd-ds {args[0]} failed (exit {returncode}); last lines of {log}:\n{tail}")


def _run_subprocess(args: list[str], log: Path) -> int:
    """`ladd-ds ARGS` as a subprocess, its output in `log`; returns its exit code."""
    cmd = [sys.executable, "-m", "ladd_ds", *args]
    # Each stage is its own one-process job: drop rendezvous variables of any enclosing job (an
    # inherited MASTER_PORT that this process already listens on fails with EADDRINUSE).
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def _run_in_process(main: Callable[[list[str]], int], args: list[str], log: Path) -> int:
    """`ladd-ds ARGS` through the commands' entry point `main` in this process, as a job of one
    rank (it joins this process's group, or starts one); Python-level output goes to `log`.
    Returns the command's exit code."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError("demo stages run in process only outside a multi-rank job")
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return main(args)
