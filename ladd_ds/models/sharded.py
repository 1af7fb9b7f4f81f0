"""Write an SD3 transformer as diffusers' (sharded) safetensors folder, one tensor at a time.

The folder is what `SD3Transformer2DModel.save_pretrained(folder, max_shard_size=...)` writes and
`SD3Transformer2DModel.from_pretrained(root, subfolder="transformer")` reads:
    config.json
    diffusion_pytorch_model.safetensors                     when everything fits in one shard, else
    diffusion_pytorch_model-00001-of-0000N.safetensors ...  and
    diffusion_pytorch_model.safetensors.index.json          {"metadata": {"total_size"}, "weight_map"}

Why not save_pretrained: it needs the whole model (a full state dict) in memory, and
safetensors' save_file serialises a whole file at once. Here the tensors come as callables that
produce one tensor each (e.g. gathered from ZeRO partitions); a shard is materialised, written
and dropped before the next one is read, so the host holds one shard (plus the copy save_file
makes of it) and the tensor being produced, whatever the model's size. Shard assignment is
huggingface_hub's (split_torch_state_dict_into_shards, the splitter save_pretrained uses), run on
meta tensors so that nothing is read to plan it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm import tqdm

from ladd_ds.core.errors import InputError
from ladd_ds.models.registry import transformer_from_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers.utils.constants.SAFETENSORS_WEIGHTS_NAME
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # diffusers' SAFE_WEIGHTS_INDEX_NAME
DEFAULT_SHARD_SIZE = "5GB"  # huggingface_hub's default; diffusers' save_pretrained uses 10GB
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub's

TensorSource = Callable[[], torch.Tensor]


def parse_size(text: str | int, key: str = "--shard-size") -> int:
    """Bytes of a size such as "5GB", "10MB", "500KB" or a plain number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise InputError(f"{key}: cannot read {text!r} as a size; write e.g. 5GB, 10MB, 500KB or a number of bytes")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise InputError(f"{key}: must be > 0 bytes, got {text!r}")
    return size


DEFAULT_SHARD_BYTES = 5 * _UNITS["GB"]


def save_sharded_transformer(
    folder: Path, config: dict, tensors: dict[str, TensorSource], dtype: torch.dtype, max_shard_size: int, desc: str = "export"
) -> list[str]:
    """Write `folder` (config.json + safetensors shards + index) for an SD3 transformer of `config`
    whose every state-dict entry `tensors` produces, cast to `dtype`. Returns the weight files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = transformer_from_config(config, meta=True)  # structure only: names, shapes, config.json
    expected = meta.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"weights do not match the model's architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    meta.save_config(folder)
    planned = {name: torch.empty(t.shape, dtype=dtype, device="meta") for name, t in expected.items()}
    split = split_torch_state_dict_into_shards(
        planned, max_shard_size=max_shard_size, filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    )
    bar = tqdm(total=len(planned), desc=desc, unit="tensor", dynamic_ncols=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            tensor = tensors[name]()
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise InputError(f"{name}: shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}")
            # A fresh tensor of its own: sources may hand out views of a larger buffer, which
            # save_file would refuse (shared storage) or write whole.
            shard[name] = torch.empty(tensor.shape, dtype=dtype).copy_(tensor)
            del tensor
            bar.update(1)
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard  # before the next shard is read
    bar.close()
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)
