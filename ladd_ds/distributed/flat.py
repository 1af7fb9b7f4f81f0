"""Reading a range of a flattened tensor saved as per-rank partitions (ZeRO-3 parameter shards,
the EMA's shards, ZeRO-1/2 flat fp32 groups), touching only the partitions that cover it, so that
memory-mapped files are read only there; and cutting a list of tensors into chunks of bounded size
(the master-weight optimizer's step, which the memory plan counts). No deepspeed import: the
trainer, the exporters and the plan use it."""

from __future__ import annotations

import torch

from ladd_ds.core.errors import InputError


def read_flat_range(
    shards: list[torch.Tensor], *, numel: int, start: int, stop: int, offsets: list[int] | None = None
) -> torch.Tensor:
    """Elements [start, stop) of a flattened tensor of `numel` elements saved as `shards` (one per
    rank, in rank order). `offsets[r]` is where shard r starts in the flattened tensor: the EMA of
    a ZeRO-1/2 rank's partition holds a piece of any size, possibly none. Without `offsets`: ZeRO-3
    partitions of ceil(numel / world) elements, the last one padded, or the full tensor on every
    rank. Only the shards overlapping the range are touched (a shard's size is read without its
    data)."""
    if start >= stop:
        return shards[0].new_zeros(0)
    if offsets is None:
        size = shards[0].numel()
        offsets = [0] * len(shards) if size >= numel else [r * size for r in range(len(shards))]
    pieces, at = [], start
    for shard, offset in zip(shards, offsets):
        # Shards may overlap (full tensors on every rank): each element is taken from the first
        # shard holding it.
        if offset <= at < offset + shard.numel():
            end = min(stop, offset + shard.numel())
            pieces.append(shard.reshape(-1)[at - offset : end - offset])
            at = end
            if at == stop:
                return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    raise InputError(
        f"no saved partition holds element {at} of a flattened tensor of {numel} elements (the ranks' files disagree)"
    )


# Elements whose fp32 gradient copies the master-weight AdamW (distributed/engines.py) holds at
# once: 512 MiB, bounded whatever the model's size (an 8B model's would be 32 GB at once).
MASTER_CHUNK_ELEMENTS = 2**27


def chunks_by_elements(numels: list[int], limit: int) -> list[list[int]]:
    """Indices of `numels`, in order, cut into consecutive chunks of at most `limit` elements (a
    tensor larger than `limit` is a chunk of its own)."""
    chunks, size = [[]], 0
    for i, n in enumerate(numels):
        if size and size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks
