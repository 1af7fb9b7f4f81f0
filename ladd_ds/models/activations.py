"""Activation memory of a transformer block's training forward, counted on the meta device.

The memory plan (ladd_ds.training.placement) needs the bytes autograd keeps between a forward and
its backward. They depend on the block's code (diffusers' joint blocks, qk-norm, dual attention),
so they are counted from the code itself: one block runs on meta tensors of the real shapes (no
memory, no compute) and every tensor autograd saves is summed once per storage.

Attention is counted as a fused kernel (flash / memory-efficient SDPA, what a GPU runs in bf16):
it keeps q, k, v, its output and one fp32 log-sum-exp per query and head, not the (S x S)
probabilities of the math fallback that the meta device would otherwise trace.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a fused attention kernel: saves what flash attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, S, D) each
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, S)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class BlockActivations:
    saved: int  # bytes autograd keeps for one block's backward (no checkpointing)
    inputs: int  # bytes of one block's inputs: all that a checkpointed block keeps


def block_activation_bytes(
    block: nn.Module, batch: int, image_tokens: int, text_tokens: int, width: int, dtype: torch.dtype
) -> BlockActivations:
    """Bytes saved for backward by one SD3 joint block (on the meta device: a model built for the
    plan, nothing materialized) at these token counts."""
    if not all(p.is_meta for p in block.parameters()):
        raise ValueError("block_activation_bytes counts on a meta-device block (build the model with device='meta')")
    meta_block = copy.deepcopy(block).to(dtype)
    params = {p.untyped_storage()._cdata for p in meta_block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:  # weights are counted by the plan, not here
            saved[storage._cdata] = storage.nbytes()
        return t

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=True)

    hidden, context, temb = meta(batch, image_tokens, width), meta(batch, text_tokens, width), meta(batch, width)
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta_block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    inputs = sum(t.numel() * t.element_size() for t in (hidden, context, temb))
    return BlockActivations(saved=sum(saved.values()), inputs=inputs)


def model_activation_bytes(
    model: nn.Module,
    batch: int,
    latent_hw: tuple[int, int],
    text_tokens: int,
    dtype: torch.dtype,
    checkpointing: bool,
    blocks_run: int | None = None,
) -> float:
    """Bytes a FlowModel's (meta) training forward keeps for backward through its first
    `blocks_run` blocks (all by default). With gradient checkpointing every block keeps only its
    inputs and one block at a time is recomputed in full. Counted from the first block (the last
    one of an SD3 model, text-free at its output, keeps a little less)."""
    tr = model.transformer
    p = tr.config.patch_size
    blocks_run = len(tr.transformer_blocks) if blocks_run is None else blocks_run
    image_tokens = (latent_hw[0] // p) * (latent_hw[1] // p)
    block = block_activation_bytes(tr.transformer_blocks[0], batch, image_tokens, text_tokens, tr.inner_dim, dtype)
    if checkpointing:
        return blocks_run * block.inputs + block.saved
    return blocks_run * block.saved
