"""Exponential moving average of the student's weights, on the local ZeRO partition.

Under ZeRO-3 each rank keeps the EMA of its own parameter shard (`param.ds_tensor`), so the EMA
costs 1/world_size of a full copy and needs no communication; below stage 3 it is the full tensor.
"""

from __future__ import annotations

import torch
from torch import nn


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
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state["shadow"][n])
