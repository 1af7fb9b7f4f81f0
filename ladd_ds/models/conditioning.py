"""Image-conditioned variants of the SD3 transformer: inpainting and instruction-based editing.

Both feed the condition to the transformer as extra input channels after the noisy latent, at
latent resolution (docs/method.md, "Extensions"):

- inpaint: the latent of the masked image (the kept pixels, the hole set to zero before
  encoding) and the mask (1 where the model must fill in), resized to the latent grid;
- edit: the latent of the source image.

The prediction keeps the latent's channels, so such a transformer has
`in_channels = C + condition channels` and `out_channels = C`. A text-to-image model is turned
into one by widening its patch embedding: the new input channels get zero weights, so the widened
model computes exactly what the original does until training moves them (and whatever the
conditions hold, at the start).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

TASKS = ("t2i", "inpaint", "edit")


def condition_channels(task: str, latent_channels: int) -> int:
    """Input channels the condition of `task` adds after the noisy latent's `latent_channels`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {list(TASKS)}")
    return {"t2i": 0, "inpaint": latent_channels + 1, "edit": latent_channels}[task]


@torch.no_grad()
def widen_input_channels(model: SD3Transformer2DModel, extra: int) -> SD3Transformer2DModel:
    """Give `model` `extra` more input channels, in place: the patch embedding's convolution gets
    zero weights for them and the config records `in_channels` (and `out_channels`, unchanged), so
    `save_pretrained` and `from_pretrained` round-trip the widened model."""
    if extra < 0:
        raise ValueError(f"extra input channels must be >= 0, got {extra}")
    if extra == 0:
        return model
    old = model.pos_embed.proj
    out_channels = model.config.out_channels or model.config.in_channels
    new = torch.nn.Conv2d(
        old.in_channels + extra,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    model.pos_embed.proj = new
    model.register_to_config(in_channels=old.in_channels + extra, out_channels=out_channels)
    return model
