"""Model size presets (one registry) and the one place that builds or loads a transformer.

A model spec is either a preset name below or a local diffusers folder with a ``transformer/``
subfolder (config.json and safetensors, as ``SD3Transformer2DModel.save_pretrained`` writes it).
Nothing is downloaded: these machines cannot reach a model hub.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from torch import nn

from ladd_ds.core.errors import InputError
from ladd_ds.models.conditioning import condition_channels, model_task, widen_input_channels, widen_weight, widened_config

# SD3 facts (docs/method.md, section 6): patch 2, joint attention dim 4096, pooled 2048, max pos 192.
PRESETS: dict[str, dict] = {
    # CPU tests: 4 latent channels, 3 blocks of width 32.
    "tiny": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        pos_embed_max_size=32,
    ),
    # CPU benchmarks one size up from tiny: 6 blocks of width 128, SD3's 16 latent channels and
    # patch 2 (256 image tokens at 256x256 pixels).
    "small": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=256,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=64,
    ),
    # The CPU demo's teacher (ladd-ds demo): 12-channel pixel-unshuffle latents of 16x16 and
    # 16x24 images (8x8 and 8x12 latent grids, patch 1: one token per 2x2 pixels), 4 blocks of
    # width 128; tiny SD3-shaped text encoders (two CLIPs of width 32).
    # diffusers' PatchEmbed spaces its sin-cos positions base / max apart, with
    # base = sample_size / patch_size and max = pos_embed_max_size; sample_size 12 with max 12 puts
    # neighbouring tokens one unit apart (what the frequencies are made for). The earlier 12/32 with
    # patch 2 spaced them 0.19 apart: neighbours had cosine similarity 0.9994, far corners 0.97,
    # and the teacher could place a blob in its quadrant but never learned a digit's shape.
    "demo": dict(
        sample_size=12,
        patch_size=1,
        in_channels=12,
        out_channels=12,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=32,
        pos_embed_max_size=12,
    ),
    # SD3-medium (2B): 24 layers, 24 heads x 64, caption projection 1536.
    "sd3-medium": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    ),
    # SD3-large (8B): 38 layers, 38 heads x 64, caption projection 2432, RMS qk-norm.
    "sd3-large": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
}


def resolve_model_config(spec: str) -> dict:
    """The transformer config of a preset or local folder, without building the model."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    folder = Path(spec)
    if not folder.exists():
        raise InputError(
            f"model '{spec}' is neither a preset ({', '.join(PRESETS)}) nor an existing folder; "
            "pass a preset name or a local diffusers folder that contains transformer/"
        )
    if not (folder / "transformer" / "config.json").is_file():
        raise InputError(
            f"model folder {folder} has no transformer/config.json; point to the root of a "
            "diffusers SD3 folder (the one holding transformer/, vae/, text_encoder/ ...)"
        )
    return dict(SD3Transformer2DModel.load_config(str(folder), subfolder="transformer"))


def task_model_config(spec: str, task: str = "t2i") -> dict:
    """The transformer config a model of `task` built from `spec` has (widened from a
    text-to-image one: models/conditioning.py)."""
    return task_config(spec, resolve_model_config(spec), task)[0]


def check_teacher_task(spec: str, task: str, *, needed_by: str) -> None:
    """A teacher that samples or judges with a condition (`synth --task`, LADD's teacher under
    `ladd.task`) must be a model of the task. Widening would build one from a text-to-image
    teacher, but its condition weights are zero and the teacher is frozen: its samples, features
    and distillation targets would ignore the condition for the whole run (a student is widened
    and then trained, so it may start from text-to-image). Only the config is read: a preset or
    folder of another task is refused before anything is built. `needed_by`: what needs it, for
    the message."""
    config = resolve_model_config(spec)
    have = model_task(config)
    if have != task:
        latent = config.get("out_channels") or config["in_channels"]
        need = latent + condition_channels(task, latent)
        raise InputError(
            f"model.teacher {spec} is a {have} transformer; {needed_by} needs a teacher trained for {task} "
            f"(in_channels {need} = latent + condition channels, this one has {config['in_channels']}): "
            f"pretrain or fine-tune one for the task first (the demo's: `ladd-ds pretrain-teacher --task {task}`). "
            "A widened text-to-image teacher has zero, frozen weights for the condition and would ignore it"
        )


def build_transformer(
    spec: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    load_weights: bool = True,
    dtype: torch.dtype = torch.float32,
    task: str = "t2i",
) -> SD3Transformer2DModel:
    """Build a preset (random init from `seed`) or load a local folder's weights, in `dtype` on
    `device`, as a transformer of `task` (models/conditioning.py): a text-to-image preset or folder
    is widened for inpainting or editing, its new input channels with zero weights.

    device="meta" builds the structure only (for --dry-run parameter counts). load_weights=False
    builds a folder's architecture with random weights (they are loaded later, shard by shard,
    when the model is built partitioned under ZeRO-3). A preset is initialized on the host in
    fp32 and then cast, so a seed gives the same weights in every dtype and on every device.
    """
    config = resolve_model_config(spec)
    wide, extra = task_config(spec, config, task)
    meta = str(device) == "meta"
    if spec not in PRESETS and not meta and load_weights:
        return load_folder_transformer(spec, wide, device, dtype)
    if meta or not load_weights:
        # Structure only: the weights are loaded later (ZeRO-3) or never (meta).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformer_from_config(wide, meta=meta)
        return model if meta else move(model, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformer_from_config(config)
    # A preset of another task is the text-to-image preset of that seed, widened: the same
    # weights, and zero ones for the condition channels (as when a t2i folder is loaded).
    return move(widen_input_channels(model, extra), device, dtype)


def task_config(spec: str, config: dict, task: str) -> tuple[dict, int]:
    """(the transformer config `task` needs, the input channels widening adds), or an error that
    names the model."""
    try:
        return widened_config(config, task, source=spec)
    except ValueError as e:
        raise InputError(f"{e}: use a text-to-image model or one trained for {task!r}") from None


def load_folder_transformer(spec: str, config: dict, device: str | torch.device, dtype: torch.dtype) -> SD3Transformer2DModel:
    """A folder's transformer loaded straight into `dtype` on `device`, one tensor at a time.

    The model is built on the meta device (no memory) and each tensor is allocated on `device` in
    `dtype` and filled from its memory-mapped safetensors file, so the host holds the model (when
    `device` is the host) plus one tensor of the file, never an fp32 copy of the model. Buffers
    the file does not hold (non-persistent ones, computed at init) are computed by a second build
    that allocates buffers only. Floating buffers end in `dtype` too, as after ``model.to(dtype)``.
    Eval mode, as ``from_pretrained`` returns it.
    """
    names = folder_weight_names(spec)
    model = transformer_from_config(config, meta=True)
    expected = model.state_dict()  # parameters and persistent buffers (meta tensors)
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"model folder {spec}: transformer weights do not match its config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; point to a folder whose safetensors were saved from a model of that config"
        )
    for name, path in names.items():
        tensor = widen_weight(name, read_folder_tensor(path, name), expected[name].shape)
        if tensor.shape != expected[name].shape:
            raise InputError(
                f"model folder {spec}: {name} in {path.name} has shape {tuple(tensor.shape)}, "
                f"its config.json makes it {tuple(expected[name].shape)}"
            )
        _set_tensor(model, name, tensor, device, dtype)
        del tensor  # unmaps the file before the next tensor is read
    unsaved = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if unsaved:
        with parameters_on_meta():
            computed = dict(transformer_from_config(config).named_buffers())
        for name in unsaved:
            _set_tensor(model, name, computed[name], device, dtype)
    return model.eval()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> None:
    """Replace the meta parameter or buffer `name` by a copy of `value` on `device`, floating
    tensors in `dtype`."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, leaf)
    tensor = torch.empty(old.shape, dtype=dtype if old.is_floating_point() else old.dtype, device=device).copy_(value)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else tensor)


def move(model: SD3Transformer2DModel, device: str | torch.device, dtype: torch.dtype) -> SD3Transformer2DModel:
    """model.to(device, dtype) (floating tensors cast, others moved) without diffusers' override,
    which warns on every cast about float32-only modules (SD3 has none)."""
    return nn.Module.to(model, device, dtype)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random init)
    and their buffers as usual, with the values their init computes."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def transformer_from_config(config: dict, meta: bool = False) -> SD3Transformer2DModel:
    """An SD3 transformer of `config` (a config.json's dict: its private "_" keys are dropped),
    randomly initialized, or on the meta device (structure only, no memory) with `meta`."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta") if meta else contextlib.nullcontext():
        return SD3Transformer2DModel.from_config(config)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def is_folder(spec: str) -> bool:
    return spec not in PRESETS


def folder_weight_names(spec: str) -> dict[str, Path]:
    """Every tensor name of a folder's transformer weights -> the safetensors file holding it
    (single file or sharded with an index), read from headers only."""

    folder = Path(spec) / "transformer"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise InputError(
            f"model folder {spec}: no diffusion_pytorch_model.safetensors (or its index) in {folder}; "
            "weights are read from safetensors only: save the transformer with save_pretrained(..., safe_serialization=True)"
        )
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def read_folder_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, as stored: a view of the memory-mapped file, whose pages
    are resident only once read and are unmapped when the tensor is freed."""

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)
