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


def per_sample_generators(sample_ids: torch.Tensor, *, seed: int, step: int, purpose: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, step, int(i), purpose)) for i in sample_ids.tolist()]


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on `device` in `dtype`. To a GPU it goes from pinned memory without blocking:
    a copy from pageable memory would make the host wait for the GPU's queued work."""
    x = x.to(dtype)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def randn_like_per_sample(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of x's shape and dtype on x's device, row b drawn from generators[b]
    (on the host, so a sample's noise is the same on every kind of device)."""
    rows = [torch.randn(x.shape[1:], generator=g) for g in generators]
    return to_device(torch.stack(rows), x.device, x.dtype)  # (B, ...)


def randn_per_sample(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn((), generator=g) for g in generators])  # (B,) on the host
