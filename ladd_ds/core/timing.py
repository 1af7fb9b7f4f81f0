"""`timed`: the wall time of a block of code, recorded under a name (the demo's stage times)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Timing:
    """The record a `timed` block writes when it ends; the block may change its key."""

    key: str


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[Timing]:
    """`with timed(timings, "synth"): ...` sets timings["synth"] to the block's wall seconds when
    the block finishes (a block that raises records nothing: the run stops there). A key that
    depends on what the block found is set inside it (`as t`: `t.key = "teacher (cached)"`)."""
    record = Timing(key)
    start = time.perf_counter()
    yield record
    timings[record.key] = time.perf_counter() - start
