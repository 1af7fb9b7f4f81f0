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


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: _local(params[n]).detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for n in self.names:
            self.shadow[n].lerp_(_local(params[n]).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise InputError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state["shadow"][n])

    def load_full(self, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) EMA tensors, keeping this rank's ZeRO-3 partition of each."""
        params = dict(module.named_parameters())
        rank = dist.get_rank() if dist.is_initialized() else 0
        for n in self.names:
            local = _local(params[n])
            flat = full[n].flatten().float()
            if local.numel() == flat.numel() and not hasattr(params[n], "ds_tensor"):
                self.shadow[n].copy_(flat.view_as(self.shadow[n]))
                continue
            size = local.numel()  # ceil(numel / world): ZeRO-3 pads the last partition
            padded = torch.cat([flat, flat.new_zeros(size * dist.get_world_size() - flat.numel())])
            self.shadow[n].copy_(padded[rank * size : (rank + 1) * size])


def gather_full_shadow(shadows: list[dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from every rank's shard (ordered by rank).

    Under ZeRO-3 each rank holds ceil(numel / world) elements of every parameter, rank-major with
    the last one padded (the layout DeepSpeed's zero_to_fp32 reassembles); below stage 3 every
    rank holds the full tensor.
    """
    out = {}
    for name in shadows[0]:
        shape = shapes[name]
        numel = math.prod(shape)
        parts = [sh[name].flatten() for sh in shadows]
        full = parts[0] if parts[0].numel() == numel else torch.cat(parts)[:numel]
        out[name] = full.view(shape).clone()
    return out
