"""Reading a range of a flattened tensor saved as per-rank partitions (ZeRO-3 parameter shards,
the EMA's shards, ZeRO-1/2 flat fp32 groups), touching only the partitions that cover it, so that
memory-mapped files are read only there. No deepspeed import: the trainer and exporters use it."""

from __future__ import annotations

import torch


def read_flat_range(shards: list[torch.Tensor], numel: int, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of a flattened tensor of `numel` elements saved as `shards` (one per
    rank, in rank order): ZeRO-3 partitions of ceil(numel / world) elements, the last one padded,
    or, below stage 3, the full tensor on every rank. Only the shards overlapping the range are
    touched."""
    if start >= stop:
        return shards[0].new_zeros(0)
    if shards[0].numel() >= numel:  # full tensors: every rank saved the same
        return shards[0].reshape(-1)[start:stop]
    size = shards[0].numel()
    pieces = []
    for r in range(start // size, (stop - 1) // size + 1):
        lo, hi = max(start, r * size), min(stop, (r + 1) * size)
        pieces.append(shards[r].reshape(-1)[lo - r * size : hi - r * size])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
