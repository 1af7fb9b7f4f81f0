"""Exponential moving average of the student's weights, on the local ZeRO partition.

Under ZeRO-3 each rank keeps the EMA of its own parameter shard (`param.ds_tensor`), so the EMA
costs 1/world_size of a full copy and needs no communication; below stage 3 it is the full tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ladd_ds.core.errors import InputError
from ladd_ds.distributed.flat import read_flat_range


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float, every: int = 1):
        self.decay = decay
        self.every = every  # update after every `every`-th optimizer step (optim.ema_every)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: _local(params[n]).detach().clone().float() for n in self.names}

    def due(self, steps_done: int) -> bool:
        """Whether the optimizer step that makes `steps_done` steps updates the EMA."""
        return steps_done % self.every == 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- shadow + (1 - decay) (param - shadow), for every parameter in one foreach
        call (one kernel launch per group of tensors on a GPU, not one per parameter). bf16
        parameters are read as fp32 copies: the EMA is kept in fp32."""
        params = dict(module.named_parameters())
        shadows = [self.shadow[n] for n in self.names]
        torch._foreach_lerp_(shadows, [_local(params[n]).float() for n in self.names], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise InputError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state["shadow"][n])

    def load_resharded(self, module: nn.Module, shadows: list[dict[str, torch.Tensor]]) -> None:
        """Load this rank's partition from the EMA shards a run of another world size saved (one
        dict per old rank, in rank order). With memory-mapped shards only the elements this rank
        keeps are read: its ZeRO-3 share, or the full tensor below stage 3."""
        params = dict(module.named_parameters())
        rank = dist.get_rank() if dist.is_initialized() else 0
        for n in self.names:
            p = params[n]
            numel = math.prod(getattr(p, "ds_shape", p.shape))
            local = self.shadow[n].view(-1)
            start = rank * local.numel() if hasattr(p, "ds_tensor") else 0
            stop = min(start + local.numel(), numel)  # ZeRO-3 pads the last partition
            piece = read_flat_range([sh[n] for sh in shadows], numel, start, stop)
            local[: piece.numel()].copy_(piece)
            local[piece.numel() :].zero_()
