"""model.attention_backend: the priority of torch's scaled-dot-product-attention kernels.

SD3's and FLUX's diffusers blocks call F.scaled_dot_product_attention, which picks the first
kernel in torch's priority order that supports the inputs (torch.nn.attention.sdpa_kernel). A
name here puts one kernel first and keeps the others enabled behind it, so shapes the preferred
kernel does not support still run; "math" is the unfused reference kernel alone; "default"
leaves torch's own order untouched.
"""

from __future__ import annotations

import contextlib
import warnings

from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
PRIORITIES: dict[str, tuple[SDPBackend, ...] | None] = {
    "default": None,
    "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH),
    "math": (SDPBackend.MATH,),
}
CUDA_ONLY = ("flash", "cudnn", "efficient")  # GPU kernels: their names mean nothing to a CPU run


def sdpa_priority(name: str, *, cuda: bool) -> tuple[SDPBackend, ...] | None:
    """The kernel priority of model.attention_backend `name`; None: torch's own.

    Without CUDA a GPU kernel's name falls back to torch's order with a warning, so a GPU config
    still dry-runs and tests on a CPU machine (the CPU has its own kernels behind the same names)."""
    if name not in PRIORITIES:
        raise ValueError(f"model.attention_backend: {name!r} is not one of {', '.join(PRIORITIES)}")
    if name in CUDA_ONLY and not cuda:
        warnings.warn(f"model.attention_backend: {name} needs a CUDA GPU; this run uses torch's default order", stacklevel=2)
        return None
    return PRIORITIES[name]


def sdpa_context(priority: tuple[SDPBackend, ...] | None):
    """The context every forward of a step runs in; entering it costs a few flag writes."""
    if priority is None:
        return contextlib.nullcontext()
    return sdpa_kernel(list(priority), set_priority=True)
