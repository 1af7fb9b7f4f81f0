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


def latent_channels(config) -> int:
    """The latent's channels of a transformer config (dict or diffusers config): its out_channels,
    which a widened model keeps while in_channels grows."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return get("out_channels") or get("in_channels")


CONDITION_COLUMNS = {"t2i": (), "inpaint": ("condition", "mask"), "edit": ("condition",)}


def model_task(config) -> str:
    """The task a transformer config was widened for, from its channels: in = out (t2i),
    in = 2 out + 1 (inpaint), in = 2 out (edit)."""
    c_in = config["in_channels"] if isinstance(config, dict) else config.in_channels
    c_out = (config.get("out_channels") if isinstance(config, dict) else config.out_channels) or c_in
    for task in TASKS:
        if c_in == c_out + condition_channels(task, c_out):
            return task
    raise ValueError(f"a transformer with in_channels {c_in} and out_channels {c_out} is none of {list(TASKS)}")


def widened_config(config: dict, task: str, *, source: str) -> tuple[dict, int]:
    """(`config` as a transformer of `task` needs it, the input channels to add): a text-to-image
    config is widened; one already of `task` is kept; any other is refused."""
    have = model_task(config)
    if have == task:
        return config, 0
    if have != "t2i":
        raise ValueError(f"model {source} is an {have} transformer (in_channels {config['in_channels']}); ladd.task is {task!r}")
    latent = config["in_channels"]
    extra = condition_channels(task, latent)
    return {**config, "in_channels": latent + extra, "out_channels": latent}, extra


def widen_weight(name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A text-to-image weight as a widened model of `shape` holds it: the patch embedding's
    convolution (D, C, p, p) padded with zeros to (D, C + extra, p, p); any other tensor as is."""
    if name != "pos_embed.proj.weight" or tensor.shape == shape:
        return tensor
    widened = tensor.new_zeros(shape)
    widened[:, : tensor.shape[1]] = tensor
    return widened


def join_condition(x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """The transformer's input: the noisy latent (B, C, h, w) and then the condition channels."""
    if condition is None:
        return x
    if condition.shape[0] != x.shape[0]:  # a batch doubled for guidance or a 2B discriminator batch
        condition = condition.repeat(x.shape[0] // condition.shape[0], 1, 1, 1)
    return torch.cat([x, condition.to(x.dtype)], dim=1)  # (B, C + extra, h, w)


def batch_condition(batch: dict, task: str) -> torch.Tensor | None:
    """The condition channels of a batch of `task`: (B, extra, h, w), or None for t2i."""
    columns = CONDITION_COLUMNS[task]
    return torch.cat([batch[c] for c in columns], dim=1) if columns else None


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W), 1 = fill in, at latent resolution (B, 1, H/f, W/f): a latent cell
    is to be filled if any of its pixels is."""
    return torch.nn.functional.max_pool2d(mask.float(), factor)


def inpaint_condition(codec, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inpainting condition of images (B, 3, H, W) in [-1, 1] and pixel masks (B, 1, H, W):
    the latent of the masked image (the hole set to 0) and the mask on the latent grid."""
    masked = image * (1.0 - mask)
    return codec.encode(masked), latent_mask(mask, codec.factor)


def paste_back(result: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainted result inside the mask, the given image everywhere else (same pixel range)."""
    return mask * result + (1.0 - mask) * image


class ConditionedTransformer(torch.nn.Module):
    """A widened transformer that diffusers' SD3 pipeline can sample: it looks like a text-to-image
    transformer (config with in_channels = out_channels) and adds `self.condition` to every input."""

    def __init__(self, transformer: SD3Transformer2DModel, condition: torch.Tensor):
        super().__init__()
        self.inner = transformer
        self.condition = condition
        self.config = type(transformer.config)({**transformer.config, "in_channels": transformer.config.out_channels})

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        return self.inner(hidden_states=join_condition(hidden_states, self.condition), **kwargs)
