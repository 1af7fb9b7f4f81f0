"""Host memory of this process, from /proc/self/status (Linux; None elsewhere)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator


def status_bytes(key: str) -> int | None:
    """A size line of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class PeakIncrease:
    before: int | None = None  # resident bytes at the start
    increase: int | None = None  # peak resident bytes inside the block, above `before`


@contextlib.contextmanager
def peak_rss_increase() -> Iterator[PeakIncrease]:
    """Measure how far the resident memory of this process rises above its level at the start of
    the block. The kernel's peak (VmHWM) is reset first (clear_refs 5); where that is not allowed,
    `increase` stays None rather than report an earlier peak."""
    result = PeakIncrease(before=status_bytes("VmRSS"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        resettable = True
    except OSError:
        resettable = False
    yield result
    peak = status_bytes("VmHWM")
    if resettable and peak is not None and result.before is not None:
        result.increase = max(0, peak - result.before)
