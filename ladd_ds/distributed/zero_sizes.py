"""ZeRO-3's gather sizes derived from the model: `"auto"` for `stage3_max_live_parameters` and
`stage3_prefetch_bucket_size` in a DeepSpeed template (docs/performance.md, "DeepSpeed templates").

One function (`resolve_zero3_sizes`) serves the engines' configs and the memory plan
(training/placement.py), so the plan counts what DeepSpeed is told. No deepspeed import: the
plan runs on meta models without it.
"""

from __future__ import annotations

from torch import nn

AUTO = "auto"
AUTO_KEYS = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters")


def _numel(p: nn.Parameter) -> int:
    # Under zero.Init a parameter's own tensor is empty; ds_numel is its full size.
    return int(getattr(p, "ds_numel", p.numel()))


def block_params(model: nn.Module) -> int:
    """Parameters of the model's largest block: the largest member of any nn.ModuleList (a
    transformer's blocks, the discriminator's heads), or without one the largest module that owns
    parameters directly (ZeRO-3 gathers per module)."""
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    if blocks:
        return max(sum(_numel(p) for p in b.parameters()) for b in blocks)
    return max((sum(_numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def zero3_live_sizes(model: nn.Module) -> dict[str, int]:
    """About two blocks gathered at once: the one computing and the next, prefetched while it
    computes. DeepSpeed's default of 1e9 live elements lets prefetch keep 12 of SD3-medium's
    85M-parameter blocks gathered (2 GB in bf16) for no more overlap."""
    block = block_params(model)
    return {"stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 2 * block}


def resolve_zero3_sizes(ds_config: dict, model: nn.Module) -> dict:
    """`ds_config` with every "auto" of AUTO_KEYS replaced by the value derived from `model`
    (a copy; the config unchanged when it has none)."""
    zero = ds_config.get("zero_optimization", {})
    auto = [k for k in AUTO_KEYS if zero.get(k) == AUTO]
    if not auto:
        return ds_config
    sizes = zero3_live_sizes(model)
    return {**ds_config, "zero_optimization": {**zero, **{k: sizes[k] for k in auto}}}


def has_auto_sizes(ds_config: dict) -> bool:
    return any(ds_config.get("zero_optimization", {}).get(k) == AUTO for k in AUTO_KEYS)
