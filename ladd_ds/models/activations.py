"""Activation memory and FLOPs of training steps, counted from the code on the meta device.

The memory plan (ladd_ds.training.placement) needs the bytes autograd keeps between a forward and
its backward. They depend on the code (diffusers' joint blocks, qk-norm, dual attention, which
inputs and weights need gradients, the method's losses), so they are counted from the code
itself: the step's forward runs on meta tensors of the real shapes (no memory, no compute) under
`SavedTensors`, which sums every tensor autograd saves once per storage, parameters excluded.
What a frozen model saves follows from its parameters' `requires_grad`: autograd keeps only what
the input gradient needs (a linear layer's input is saved for its weight's gradient only).

Attention is counted as a fused kernel (flash / memory-efficient SDPA, what a GPU runs in bf16):
it keeps q, k, v, its output and one fp32 log-sum-exp per query and head, not the (S x S)
probabilities of the math fallback that a CPU or the meta device would otherwise trace.
`fused_attention` swaps such a kernel in for `F.scaled_dot_product_attention`; it computes real
attention too, so a CPU step run under it saves what the plan counts (tests/test_placement.py).

Gradient checkpointing (FlowModel.set_checkpointing): a checkpointed block keeps its inputs only,
which the count sees as such (torch's non-reentrant checkpoint saves them for the recompute); in
backward each one runs its forward again, so the peak adds one block's full saved bytes
(`recompute_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ladd_ds.models.flow_model import recomputing

_SDPA = F.scaled_dot_product_attention


class _FusedAttention(torch.autograd.Function):
    """A stand-in for a fused attention kernel: saves what flash attention saves and recomputes
    the probabilities in backward, as flash attention does (its five matmuls). Real attention on
    real tensors (the probabilities are freed at once), shapes only on meta tensors; the same
    explicit matmuls on both, so FLOPs are counted alike (torch picks other SDPA kernels per
    device)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):  # (B, H, S, D) each
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        probs = (q @ k.transpose(-2, -1) * scale).float().softmax(-1).to(q.dtype)  # (B, H, S, S), freed here
        out = probs @ v  # (B, H, S, D)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, S): flash's log-sum-exp, never read here
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # (B, H, S, D)
        q, k, v, out, _ = ctx.saved_tensors
        probs = (q @ k.transpose(-2, -1) * ctx.scale).float().softmax(-1).to(q.dtype)  # (B, H, S, S)
        grad_v = probs.transpose(-2, -1) @ grad
        grad_probs = grad @ v.transpose(-2, -1)  # (B, H, S, S)
        # softmax backward: P * (dP - rowsum(dO * O)), rowsum(dO * O) = rowsum(dP * P)
        grad_scores = probs * (grad_probs - (grad * out).sum(-1, keepdim=True)) * ctx.scale
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v, None


@contextlib.contextmanager
def fused_attention():
    """`F.scaled_dot_product_attention` as a fused kernel's memory (module docstring); for the
    plain attention that SD3's joint attention asks for (no mask, dropout or causal flag)."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            raise NotImplementedError("fused_attention stands in for unmasked, dropout-free attention only")
        return _FusedAttention.apply(query, key, value, scale)

    previous, F.scaled_dot_product_attention = F.scaled_dot_product_attention, sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous


class SavedTensors:
    """Context: the bytes autograd saves for backward while it is active, once per storage,
    the parameters of `modules` excluded (the plan counts weights apart), by the module whose
    forward was running (`owners`: name -> module; "other" outside them, e.g. losses)."""

    def __init__(self, owners: dict[str, nn.Module]):
        self.owners = owners
        self.params = {p.untyped_storage()._cdata for m in owners.values() for p in m.parameters()}
        self.by_owner: dict[str, int] = {}
        self._kept: dict[int, torch.UntypedStorage] = {}  # alive: a freed storage's key could be reused
        self._current = "other"
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.by_owner.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self._kept:
            self._kept[key] = storage
            self.by_owner[self._current] = self.by_owner.get(self._current, 0) + storage.nbytes()
        return t

    def __enter__(self) -> SavedTensors:
        for name, module in self.owners.items():

            def enter(*_, name=name):
                self._current = name

            def leave(*_):
                self._current = "other"

            self._stack.callback(module.register_forward_pre_hook(enter).remove)
            self._stack.callback(module.register_forward_hook(leave).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._kept.clear()


@dataclass(frozen=True)
class BlockActivations:
    saved: int  # bytes autograd keeps for one block's backward (no checkpointing)
    inputs: int  # bytes of one block's inputs: all that a checkpointed block keeps


def block_activation_bytes(
    block: nn.Module, *, batch: int, image_tokens: int, text_tokens: int, width: int, dtype: torch.dtype
) -> BlockActivations:
    """Bytes saved for backward by one SD3 joint block (on the meta device: a model built for the
    plan, nothing materialized) at these token counts. The image and text tokens need a gradient
    (the student's fakes flow through every block, and every joint attention mixes the text
    tokens with them: all but a frozen model's first block see them so); the time embedding only
    when the block trains (it comes from a trained embedder then, from a frozen one otherwise)."""
    if not all(p.is_meta for p in block.parameters()):
        raise ValueError("block_activation_bytes counts on a meta-device block (build the model with device='meta')")
    meta_block = copy.deepcopy(block).to(dtype)
    trained = any(p.requires_grad for p in meta_block.parameters())

    def meta(*shape, grad=True):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)

    hidden = meta(batch, image_tokens, width)
    context, temb = meta(batch, text_tokens, width), meta(batch, width, grad=trained)
    with fused_attention(), SavedTensors({"block": meta_block}) as saved:
        meta_block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        total = saved.total
    inputs = sum(t.numel() * t.element_size() for t in (hidden, context, temb))
    return BlockActivations(saved=total, inputs=inputs)


def recompute_bytes(model: nn.Module, *, batch: int, latent_hw: tuple[int, int], text_tokens: int, dtype: torch.dtype) -> int:
    """What a checkpointed FlowModel adds in backward at most: one checkpointed block's saved
    bytes while it is recomputed (the first checkpointed block's code, with the inputs of a block
    inside the model: all joint blocks but SD3's text-free last one keep the same); 0 without
    checkpointed blocks."""
    blocks = model.checkpointed_blocks
    if not blocks:
        return 0
    tr = model.transformer
    p = tr.config.patch_size
    image_tokens = (latent_hw[0] // p) * (latent_hw[1] // p)
    block = tr.transformer_blocks[blocks[0]]
    return block_activation_bytes(
        block, batch=batch, image_tokens=image_tokens, text_tokens=text_tokens, width=tr.inner_dim, dtype=dtype
    ).saved


class RecomputeFlops(TorchDispatchMode):
    """Context: the FLOPs of the steps run inside it (torch's FLOP formulas of FlopCounterMode:
    matmuls, convolutions, attention; on meta tensors, from shapes), and the part gradient
    checkpointing adds: what checkpointed blocks run again in backward (FlowModel's checkpoint
    marks it; torch stops a recompute early once every saved tensor is back, which the count
    follows). FlopCounterMode itself is not used: its module tracker's backward hooks fail inside
    `torch.autograd.grad` (R1's penalty)."""

    def __init__(self):
        super().__init__()
        self.total = self.recompute = 0
        self._stack = contextlib.ExitStack()

    @property
    def relative(self) -> float:
        """What the recompute adds, relative to the step without checkpointing."""
        base = self.total - self.recompute
        return self.recompute / base if base else 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.total += flops
            self.recompute += flops if recomputing() else 0
        return out

    def __enter__(self) -> RecomputeFlops:
        self._stack.enter_context(fused_attention())
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._stack.close()


def model_activation_bytes(
    model: nn.Module, *, batch: int, latent_hw: tuple[int, int], text_tokens: int, dtype: torch.dtype
) -> int:
    """Bytes a (meta) FlowModel's training forward keeps for backward, with its checkpointing
    as set (DPO's model; LADD counts its whole steps, ladd_ds.ladd.build)."""
    tr = model.transformer
    model = copy.deepcopy(model).to(dtype)

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    x = meta(batch, tr.config.in_channels, *latent_hw)
    t = torch.empty(batch, device="meta")
    context, pooled = meta(batch, text_tokens, tr.config.joint_attention_dim), meta(batch, tr.config.pooled_projection_dim)
    with fused_attention(), SavedTensors({"model": model}) as saved:
        model(x, t, context, pooled)
        return saved.total
