"""Exponential moving average of the student's weights, on the local ZeRO partition.

Each rank keeps the EMA of the part of the weights its ZeRO partition owns, so from ZeRO-1 on the
EMA costs 1/world_size of a full fp32 copy (4 B/param / world) and needs no communication:

- ZeRO-3: each parameter's own shard (`param.ds_tensor`);
- ZeRO-1/2: the elements of each parameter that lie in this rank's fp32 optimizer partition
  (`ranges`, from ladd_ds.distributed.engines.partition_ranges), read from the bf16 (or fp32)
  weights after the step, which DeepSpeed has all-gathered on every rank;
- ZeRO-0: the whole tensor (nothing is partitioned; on one rank there is nothing to shard).

The EMA follows the weights the forward uses (bf16 in a bf16 run, read as fp32 copies) at every
stage, so a sharded EMA is bit for bit the slices of the unsharded one. Each rank saves its pieces
with their offsets in the flattened parameters: an export or a resume at another world size or
stage reads any range from the pieces that cover it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ladd_ds.core.errors import InputError
from ladd_ds.distributed.flat import read_flat_range


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float, every: int = 1, *, ranges: dict[str, tuple[int, int]] | None = None):
        """`ranges`: for a ZeRO-1/2 engine, [start, stop) of each trained parameter's flattened
        elements that this rank's optimizer partition holds; None at ZeRO-0 and ZeRO-3."""
        self.decay = decay
        self.every = every  # update after every `every`-th optimizer step (optim.ema_every)
        self.ranges = ranges
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.numel = {n: math.prod(getattr(params[n], "ds_shape", params[n].shape)) for n in self.names}
        self.offset = {n: self._offset(n, params[n]) for n in self.names}
        self.shadow = {n: self._local(n, params[n]).detach().clone().float() for n in self.names}
        # Parameters of which this rank keeps something: at ZeRO-1/2 a rank's partition covers only
        # some of them, and the update's foreach call takes no empty tensors (and no empty list).
        self.kept = [n for n in self.names if self.shadow[n].numel() > 0]

    def _local(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The part of parameter `name` this rank keeps the EMA of."""
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor
        if self.ranges is not None:
            start, stop = self.ranges[name]
            return p.data.view(-1)[start:stop]  # ZeRO-1/2 weights are views of one flat buffer
        return p.data

    def _offset(self, name: str, p: torch.Tensor) -> int:
        """Where this rank's part starts in the flattened parameter."""
        if hasattr(p, "ds_tensor"):  # ZeRO-3: rank r holds [r * size, (r + 1) * size), the last padded
            return (dist.get_rank() if dist.is_initialized() else 0) * p.ds_tensor.numel()
        return self.ranges[name][0] if self.ranges is not None else 0

    def due(self, steps_done: int) -> bool:
        """Whether the optimizer step that makes `steps_done` steps updates the EMA."""
        return steps_done % self.every == 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- shadow + (1 - decay) (param - shadow), for every parameter in one foreach
        call (one kernel launch per group of tensors on a GPU, not one per parameter). bf16
        parameters are read as fp32 copies: the EMA is kept in fp32."""
        if not self.kept:  # a ZeRO-1/2 rank whose partition holds only the group's padding
            return
        params = dict(module.named_parameters())
        shadows = [self.shadow[n] for n in self.kept]
        torch._foreach_lerp_(shadows, [self._local(n, params[n]).float() for n in self.kept], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        """This rank's pieces, saved by this rank in a run of the same world size and stages."""
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise InputError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.names:
            saved, offset = state["shadow"][n], state.get("offset", self.offset)[n]
            if saved.numel() != self.shadow[n].numel() or offset != self.offset[n]:
                raise InputError(
                    f"EMA state of {n}: saved elements [{offset}, {offset + saved.numel()}), this rank keeps "
                    f"[{self.offset[n]}, {self.offset[n] + self.shadow[n].numel()}): the run's ZeRO stage changed; "
                    "resume with the stage it was saved with"
                )
            self.shadow[n].copy_(saved.view_as(self.shadow[n]))

    def load_resharded(self, states: list[dict]) -> None:
        """Load this rank's pieces from the EMA states a run of another world size (or stage)
        saved (one per old rank, in rank order). With memory-mapped states only the elements this
        rank keeps are read."""
        for n in self.names:
            local = self.shadow[n].view(-1)
            start = self.offset[n]
            stop = min(start + local.numel(), self.numel[n])  # ZeRO-3 pads the last partition
            piece = read_ema_range(states, n, numel=self.numel[n], start=start, stop=stop)
            local[: piece.numel()].copy_(piece)
            local[piece.numel() :].zero_()


def read_ema_range(states: list[dict], name: str, *, numel: int, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of parameter `name`'s flattened EMA (`numel` elements) from the EMA
    states every rank of a run saved (ShardedEMA.state_dict, in rank order), touching only the
    pieces that cover them. States saved before the offsets were recorded hold ZeRO-3 shards or
    full tensors."""
    shards = [s["shadow"][name] for s in states]
    offsets = [s["offset"][name] for s in states] if all("offset" in s for s in states) else None
    return read_flat_range(shards, numel=numel, start=start, stop=stop, offsets=offsets)
