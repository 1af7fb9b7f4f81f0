"""A diffusers SD3 transformer seen as a rectified-flow model, with feature taps.

The same wrapper serves the student (velocity) and the frozen teacher inside the discriminator
(image tokens after selected blocks). It is the module DeepSpeed wraps, so every call goes through
its forward and ZeRO-3's gather hooks fire in the same order on every rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from diffusers import SD3Transformer2DModel
from torch import nn

from ladd_ds.core.flow import TIMESTEP_SCALE
from ladd_ds.models.conditioning import widen_weight
from ladd_ds.models.registry import build_transformer, folder_weight_names, is_folder, read_folder_tensor

# Every block runs the same code (the block class's forward), so all blocks of every compiled
# model share one Dynamo cache: a graph per block kind (SD3's last block differs), grad mode,
# train/eval mode and input shape. The LADD step makes 7 for one bucket shape (tiny model), and
# previews and a second bucket add more; past Dynamo's default limit of 8 the blocks would run
# eager again, with nothing but a logged warning.
RECOMPILE_LIMIT = 128


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, C) image tokens -> (B, C, h, w); PatchEmbed flattens the patch grid row-major."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} image tokens do not form a {h}x{w} grid")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)


class _Recomputing:
    """Entered while a checkpointed block runs its forward again in backward: the memory plan's
    FLOP count asks (`recomputing`, ladd_ds.models.activations)."""

    depth = 0

    def __enter__(self):
        _Recomputing.depth += 1

    def __exit__(self, *exc):
        _Recomputing.depth -= 1


def recomputing() -> bool:
    return _Recomputing.depth > 0


def _checkpoint_contexts():
    return contextlib.nullcontext(), _Recomputing()


def _checkpoint_marked(block: nn.Module, *args):
    """diffusers' gradient-checkpointing function, per block: only blocks marked by
    `FlowModel.set_checkpointing` are checkpointed (non-reentrant, as diffusers' default: it
    works with frozen parameters and keyword arguments), the others run as usual."""
    if getattr(block, "checkpointed", False):
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=_checkpoint_contexts)
    return block(*args)


class FlowModel(nn.Module):
    def __init__(self, transformer: SD3Transformer2DModel):
        super().__init__()
        self.transformer = transformer
        self.checkpoint_stride = 0  # set_checkpointing's `every`

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def feature_dim(self) -> int:
        return self.transformer.inner_dim

    def set_checkpointing(self, every: int) -> None:
        """Gradient checkpointing of every `every`-th block (blocks 0, every, 2 * every, ...; 0:
        none, 1: all; model.gradient_checkpointing). A checkpointed block keeps only its inputs
        for backward and runs its forward again there. Both paths through the blocks (diffusers'
        forward and `_tapped_features`) call the transformer's checkpointing function."""
        tr = self.transformer
        self.checkpoint_stride = every
        for index, block in enumerate(tr.transformer_blocks):
            block.checkpointed = every > 0 and index % every == 0
        if every > 0:
            tr.enable_gradient_checkpointing(_checkpoint_marked)
        else:
            tr.disable_gradient_checkpointing()

    @property
    def checkpointed_blocks(self) -> list[int]:
        blocks = self.transformer.transformer_blocks
        on = self.transformer.gradient_checkpointing
        return [i for i, b in enumerate(blocks) if on and getattr(b, "checkpointed", False)]

    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place (model.compile). `nn.Module.compile`
        keeps the module tree, so parameter names, state dicts and checkpoints do not change, and
        both paths through the blocks (diffusers' forward and `_tapped_features`) run them
        compiled. Static shapes: a bucket's shape never changes, and its kernels are specialised."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for block in self.transformer.transformer_blocks:
            block.compile(dynamic=False)

    def forward(self, x, t, prompt_embeds, pooled, taps: list[int] | None = None, velocity: bool = False):
        """Velocity (B, C, H, W) for x at time t in [0, 1]; or, with `taps`, the image tokens after
        each tapped block as (B, inner_dim, H/p, W/p) grids, stopping after the last tapped block;
        with `taps` and `velocity`, (those grids, the velocity) from one pass through every block."""
        # fp32 whatever the model's dtype (diffusers' sinusoidal embedding computes in fp32 and casts
        # its output): in bf16, 1000 * 0.75 would be rounded to 752.
        timestep = t.float() * TIMESTEP_SCALE  # (B,)
        if taps is None:  # the velocity alone: the same pass, its blocks called as below
            return self._tapped_features(x, timestep, prompt_embeds, pooled, [], True)[1]
        return self._tapped_features(x, timestep, prompt_embeds, pooled, taps, velocity)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def _tapped_features(self, x, timestep, prompt_embeds, pooled, taps, velocity):
        # Mirrors SD3Transformer2DModel.forward (diffusers 0.39): there is no hook for intermediate
        # tokens, and without `velocity` stopping early saves the remaining blocks' compute.
        tr = self.transformer
        p = tr.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        hidden = tr.pos_embed(x)  # (B, N, C)
        temb = tr.time_text_embed(timestep, pooled)  # (B, C)
        context = tr.context_embedder(prompt_embeds)  # (B, L, C)
        wanted = set(taps)
        features = {}
        blocks = tr.transformer_blocks if velocity else tr.transformer_blocks[: max(taps) + 1]
        for index, block in enumerate(blocks):
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                context, hidden = tr._gradient_checkpointing_func(block, hidden, context, temb, None)
            else:
                # Positional, not diffusers' keywords: torch module hooks see positional inputs only.
                # A block that is a ZeRO-3 leaf (deepspeed.z3_leaf_blocks) reduces its gradients in
                # a full backward hook, which for a call with no positional tensors fires on the
                # gradient of its outputs, before the block's own backward (deepspeed 0.19.8,
                # stage3.py reduce_leaf_module_grads), and releases its weights only after the
                # gradients of its (positional) inputs.
                context, hidden = block(hidden, context, temb)
            if index in wanted:
                features[index] = tokens_to_grid(hidden, h, w)  # (B, C, h, w)
        tapped = [features[i] for i in taps]
        if not velocity:
            return tapped
        out = tr.proj_out(tr.norm_out(hidden, temb))  # (B, N, p * p * C_out)
        c_out = tr.out_channels
        out = out.reshape(out.shape[0], h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (B, C_out, h, p, w, p)
        return tapped, out.reshape(out.shape[0], c_out, h * p, w * p)  # (B, C_out, H, W)


def build_flow_model(
    spec: str,
    *,
    seed: int,
    device: str | None = None,
    ds_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    task: str = "t2i",
) -> FlowModel:
    """A FlowModel from a preset or folder in `dtype` (the training precision), as a transformer
    of `task` (a text-to-image model is widened for inpainting or editing: registry.build_transformer);
    partitioned over the ranks under a ZeRO-3 `ds_config`, else on `device` (by default the host,
    or with a `ds_config` this rank's device, where its engine will hold it). A folder is loaded
    straight into `dtype` on that device (registry.load_folder_transformer); under ZeRO-3 zero.Init
    casts to the config's precision and `dtype` is not used."""
    # Imports deepspeed (about 0.5 s after torch on 2 cores): only when building, so that `ladd-ds
    # sample` and the model code stay free of it.
    from ladd_ds.distributed import engines as ds

    if ds_config is None or device == "meta":
        return FlowModel(build_transformer(spec, seed=seed, device=device or "cpu", dtype=dtype, task=task))
    if ds.zero_stage(ds_config) < 3:
        return FlowModel(build_transformer(spec, seed=seed, device=device or ds.device(), dtype=dtype, task=task))
    with ds.partitioned_init(ds_config):
        model = FlowModel(build_transformer(spec, seed=seed, load_weights=False, task=task))
    if is_folder(spec):
        ds.load_partitioned_weights(model.transformer, folder_weight_names(spec), read_folder_tensor, spec, widen_weight)
    elif task != "t2i":
        # zero.Init draws a preset's weights at the widened shapes; the widened t2i preset (what
        # every other path builds) is made on the host and copied in. Presets are test sizes.
        weights = build_transformer(spec, seed=seed, task=task).state_dict()
        ds.load_partitioned_weights(model.transformer, dict.fromkeys(weights), lambda _, name: weights[name], spec)
    return model
