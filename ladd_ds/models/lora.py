"""LoRA adapters on the SD3 transformer through peft (diffusers' PeftAdapterMixin).

DPO trains only the adapters; the reference model is the same transformer with the adapters
switched off (`adapters_disabled`), so no second copy of the weights is held (docs/method.md, section 5).

Saved form (`save_lora` / `load_lora`), a folder:
    adapter_config.json                  peft LoraConfig (rank, alpha, target modules)
    pytorch_lora_weights.safetensors     the lora_A / lora_B weights, keys "transformer.<module>..."
The key prefix and the metadata are those of diffusers' pipeline-level LoRA files, so
`SD3Transformer2DModel.load_lora_adapter(folder, prefix="transformer")` reads them too.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.files import atomic_directory

# Attention projections of SD3's joint blocks (image stream and text stream); the last block has
# no text-stream output projection (context_pre_only), which suffix matching tolerates.
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MLP_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "transformer."
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base's key


def lora_config(
    rank: int, *, alpha: float | None = None, targets: list[str] | None = None, mlp: bool = False, dropout: float = 0.0
):
    """A peft LoraConfig for the SD3 transformer. `alpha` None means alpha = rank (scale 1).
    lora_B starts at zero (peft's default), so a fresh adapter leaves the model unchanged."""

    modules = list(targets or ATTENTION_TARGETS) + (MLP_TARGETS if mlp else [])
    return LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=modules,
        lora_dropout=dropout,
        init_lora_weights=True,
    )


def lora_config_from(settings):
    """The LoraConfig of a run's `dpo.lora` section (ladd_ds.config.LoRAConfig)."""
    return lora_config(settings.rank, alpha=settings.alpha, targets=settings.targets, mlp=settings.mlp, dropout=settings.dropout)


def add_lora(transformer: nn.Module, config, seed: int = 0) -> list[str]:
    """Add the adapter, freeze everything else. Returns the names of the trainable parameters.
    lora_A's random init comes from `seed` alone, so every rank (and a single-process run) starts
    from the same adapter whatever the global RNG went through before."""
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)  # peft marks only the lora_ weights trainable
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if not names:
        raise InputError(f"LoRA targets {sorted(config.target_modules)} match no module of the transformer")
    return names


@contextlib.contextmanager
def adapters_disabled(transformer: nn.Module):
    """The reference model: the same transformer with every LoRA layer bypassed."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def lora_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a full transformer state dict (peft names, adapter name dropped):
    '...to_q.lora_A.default.weight' -> 'transformer....to_q.lora_A.weight'."""
    out = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            out[PREFIX + name.replace(".default.", ".")] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def save_lora(out: str | Path, weights: dict[str, torch.Tensor], config) -> Path:
    """Write a LoRA folder atomically (temporary name, then rename)."""

    out = Path(out)
    if not weights:
        raise InputError(f"no LoRA weights to write to {out}")
    cfg = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        # The adapter config also goes into the safetensors metadata, keyed as diffusers' pipeline
        # LoRA files key it ("transformer.lora_alpha", ...): without it diffusers' loaders assume
        # alpha = rank and scale the adapter wrongly.
        packed = json.dumps({PREFIX + k: v for k, v in cfg.items()}, sort_keys=True)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: packed})
    return out


def read_lora(folder: str | Path):
    """(LoraConfig, weights without the 'transformer.' prefix, in peft's naming) of a LoRA folder."""

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise MissingInputError(f"LoRA folder {folder} lacks {name} (write one with `ladd-ds export` of a DPO run)")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    config = LoraConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        target_modules=raw["target_modules"],
        lora_dropout=raw.get("lora_dropout", 0.0),
    )
    weights = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    return config, weights


def load_lora(transformer: nn.Module, folder: str | Path, merge: bool = False) -> nn.Module:
    """Add the LoRA of `folder` to `transformer` (in place). `merge`: fold it into the base
    weights and remove the adapter layers, leaving a plain transformer."""

    config, weights = read_lora(folder)
    add_lora(transformer, config)
    result = set_peft_model_state_dict(transformer, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise InputError(f"LoRA {folder}: weights for modules this transformer lacks, e.g. {unexpected[:3]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise InputError(f"LoRA {folder}: no weights for {missing[:3]} (was it trained on another model?)")
    if merge:
        transformer.fuse_lora()
        transformer.unload_lora()
    transformer.requires_grad_(False)
    return transformer


def merged_sources(tensors: dict[str, Callable[[], torch.Tensor]], folder: str | Path) -> dict[str, Callable[[], torch.Tensor]]:
    """`tensors` (name -> callable producing the base weight) with the LoRA of `folder` folded into
    the weights it adapts, one weight at a time when produced: W + (B @ A) * alpha / r, peft's
    merge of a Linear LoRA (what `load_lora(..., merge=True)` does on a whole model in memory)."""
    config, weights = read_lora(folder)
    scale = config.lora_alpha / config.r
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    lacking = [m for m in modules if f"{m}.weight" not in tensors]
    if lacking:
        raise InputError(f"LoRA {folder}: weights for modules this transformer lacks, e.g. {lacking[:3]}")
    out = dict(tensors)
    for module in modules:
        a, b = weights.get(f"{module}.lora_A.weight"), weights.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise InputError(f"LoRA {folder}: {module} lacks its lora_A or lora_B weight (was the folder written by ladd-ds?)")
        out[f"{module}.weight"] = functools.partial(_merge_one, tensors[f"{module}.weight"], a, b, scale)
    return out


def _merge_one(base: Callable[[], torch.Tensor], a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    weight = base()  # (out, in)
    return weight + (b.to(weight.dtype) @ a.to(weight.dtype)) * scale  # (out, r) @ (r, in)
