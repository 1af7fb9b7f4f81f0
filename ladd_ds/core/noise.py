"""Per-sample randomness derived from (seed, step, sample id, purpose).

Deriving every draw from the sample's own id, not from a rank's RNG stream, makes a step's noise
independent of how samples are spread over ranks and micro-batches, and makes resume exact without
restoring any generator state (docs/method.md, section 1).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def per_sample_generators(sample_ids: torch.Tensor, seed: int, step: int, purpose: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, step, int(i), purpose)) for i in sample_ids.tolist()]


def randn_like_per_sample(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of x's shape, row b drawn from generators[b]."""
    rows = [torch.randn(x.shape[1:], generator=g) for g in generators]
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)  # (B, ...)


def randn_per_sample(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn((), generator=g) for g in generators])  # (B,)
