"""RUN_DIR/train.log, and warnings that would otherwise repeat at every step.

What goes into the log file (appended across resumes, one header line per start):
- rank 0's printed lines: everything `print0` prints (it also logs to the "ladd_ds" logger) and
  the plain loss lines of logging steps;
- warnings and errors of every rank, prefixed with the rank: Python `warnings.warn` from any
  library (records of the "py.warnings" logger, as `logging.captureWarnings` makes them),
  DeepSpeed's logger warnings, and the traceback of an exception that ends the run
  (`logged_exceptions`).

Every rank appends to the one file rather than writing a file per rank: a user reads one file,
and a rank's failure stands next to rank 0's last step. Each record is one `os.write` on a
descriptor opened with O_APPEND, so records of different ranks never interleave within a line on
a local disk or on the parallel file systems run directories live on (Lustre, GPFS append at the
end atomically per write call). Over NFS concurrent appends from several hosts can overwrite each
other; only warnings and errors come from ranks other than 0, so this is rare there and costs at
most a lost line of one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path

from ladd_ds.core.errors import LaddError

LOG_FILE = "train.log"
LOGGER = "ladd_ds"  # print0 logs its lines here (ladd_ds.distributed.ranks)
# Python warnings, and DeepSpeed's own logger (deepspeed.utils.logging): their warnings and errors
# go to the file as well.
LIBRARY_LOGGERS = ("py.warnings", "DeepSpeed")

# Warnings raised at every training step, shown once per process. On torch 2.14 DeepSpeed 0.19's
# ZeRO collectives (deepspeed/comm/torch.py) call the deprecated `all_gather_into_tensor` and
# `reduce_scatter_tensor`: a 2-line FutureWarning each, at every step of a multi-rank run (4 steps
# on 2 CPU ranks printed 36 lines). Python's own "default" and "once" actions do not hold them
# back: both remember what was shown in a registry that is cleared whenever the warning filters
# change, and DeepSpeed's CPU accelerator runs `numactl` at every ZeRO-3 gradient reduction,
# whose subprocess start enters `warnings.catch_warnings` (os.get_exec_path). Hence our own count.
REPEATED_WARNINGS = (
    re.compile(r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    re.compile(r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
)
_shown: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as records of the "py.warnings" logger, as `logging.captureWarnings` makes
    them: printed on stderr as Python prints them, and into the log file while a run has one;
    REPEATED_WARNINGS only the first time. (Our function rather than captureWarnings': it can be
    installed again where something replaced it, e.g. a `catch_warnings(record=True)`.)"""
    text = str(message)
    repeated = next((p.pattern for p in REPEATED_WARNINGS if p.search(text)), None)
    if repeated is not None:
        if repeated in _shown:
            return
        _shown.add(repeated)
    formatted = warnings.formatwarning(message, category, filename, lineno, line)
    if file is not None:  # an explicit destination, as captureWarnings honours it too
        file.write(formatted)
        return
    logging.getLogger("py.warnings").warning(formatted.rstrip("\n"))


def capture_warnings() -> None:
    """Route Python warnings through `_show_warning` (idempotent; call at startup)."""
    if warnings.showwarning is not _show_warning:
        warnings.showwarning = _show_warning
    log = logging.getLogger("py.warnings")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        stderr = _Stderr()
        stderr.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(stderr)
        log.propagate = False


def logger() -> logging.Logger:
    log = logging.getLogger(LOGGER)
    if not log.handlers:
        # Without any handler logging falls back to printing WARNING records on stderr, which
        # would print a traceback `logged_exceptions` writes a second time before it is raised.
        log.addHandler(logging.NullHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def log_line(message: str) -> None:
    """A line for the log file only (the console shows it another way, e.g. the progress bar)."""
    logger().info(message)


class _AppendHandler(logging.Handler):
    """Each record is formatted whole and written with one `os.write` to an O_APPEND descriptor
    (logging.FileHandler writes through a buffered stream, which splits a long record such as a
    traceback into several writes that other ranks' records could come between)."""

    def __init__(self, fd: int, rank: int, level: int):
        super().__init__(level)
        self.fd = fd
        self.setFormatter(_Formatter(rank))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    """rank 0's lines as printed; warnings and errors with time, rank and level."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().rstrip("\n")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno < logging.WARNING:
            return text
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp} [rank {self.rank}] {record.levelname} {text}"


class _Stderr(logging.StreamHandler):
    """The current sys.stderr (tests and the CLI may redirect it after this is created): where
    captured Python warnings are still printed, in the format Python prints them in."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class RunLog:
    """RUN_DIR/train.log of this process while a run trains; `close` detaches it."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, resume_step: int | None):
        self.path = Path(run_dir) / LOG_FILE
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # Our lines on rank 0, warnings and errors on the others; libraries' warnings and errors
        # on every rank (their INFO records stay where the library prints them).
        ours = _AppendHandler(self.fd, rank, logging.INFO if rank == 0 else logging.WARNING)
        libraries = _AppendHandler(self.fd, rank, logging.WARNING)
        self.handlers = [(LOGGER, ours)] + [(name, libraries) for name in LIBRARY_LOGGERS]
        capture_warnings()
        for name, handler in self.handlers:
            (logger() if name == LOGGER else logging.getLogger(name)).addHandler(handler)
        if rank == 0:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            resumed = f"resumes from step {resume_step}" if resume_step else "starts at step 0"
            logger().info(f"=== {started} on {socket.gethostname()}: {command_line()} | world size {world_size} | {resumed}")

    def close(self) -> None:
        """Detach the file (idempotent)."""
        if self.fd is None:
            return
        for name, handler in self.handlers:
            logging.getLogger(name).removeHandler(handler)
        os.close(self.fd)
        self.fd = None


def command_line() -> str:
    """This process's command line as the user typed it (`python -m ladd_ds` shows as such)."""
    argv0 = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    program = f"python -m {argv0.parent.name}" if argv0.name == "__main__.py" else argv0.name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def log_exception(error: BaseException, *, reported: tuple[type[BaseException], ...] = ()) -> None:
    """Write an exception that ends the run into the log file: a user's mistake (LaddError) as
    its one line, anything else with its traceback; `reported`: exceptions the caller reports
    itself (a line it prints)."""

    if isinstance(error, LaddError):
        logger().error(f"error: {error}")
    elif not isinstance(error, reported):
        logger().error("the run stopped with an exception", exc_info=(type(error), error, error.__traceback__))


@contextlib.contextmanager
def logged_exceptions(*, reported: tuple[type[BaseException], ...] = ()):
    """`log_exception` for an exception that propagates out of the block."""
    try:
        yield
    except BaseException as e:
        log_exception(e, reported=reported)
        raise
