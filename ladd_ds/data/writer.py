"""Write ladd_ds latent datasets (MDS shards) atomically.

`write_samples` is the one writer: the built-in "random latents" source uses it, and so will
teacher-generated latents. It writes into a hidden temporary sibling directory and renames it
into place, so a crash never leaves a directory with an index.json that looks complete.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import save_file
from streaming import MDSWriter

from ladd_ds.config import check_compression
from ladd_ds.core.errors import InputError, OutputExistsError
from ladd_ds.core.files import atomic_directory
from ladd_ds.data.schema import (
    LATENTS,
    NEGATIVE_PROMPT_FILE,
    SHARD_HASH,
    TEXT_COLUMNS,
    TEXT_STORAGE,
    TORCH_DTYPES,
    Layout,
    validate_mds_dir,
)

# JSON text, but not named *.json: streaming's merge_index(root) takes every .json file under
# root's sub-directories for an index.json and fails on anything else (streaming 0.13).
RANDOM_PARAMS_FILE = "random_latents.params"


def _to_fp16(value: Any) -> np.ndarray:
    # Generators hand over torch tensors (often bf16 on GPU); MDS stores latents as numpy fp16.
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float16).numpy()
    return np.ascontiguousarray(value, dtype=np.float16)


def text_storage(value: Any) -> str:
    """The stored dtype of a text column value: its own, bit for bit ("fp32", "bf16", "fp16");
    other dtypes are stored as fp32."""
    if isinstance(value, torch.Tensor):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(value.dtype, "fp32")
    return "fp16" if np.asarray(value).dtype == np.float16 else "fp32"


def _to_stored(value: Any, storage: str) -> np.ndarray:
    """A text tensor as the numpy array of `storage` (schema.TEXT_STORAGE); bf16 as its raw bits."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    value = value.detach().cpu()
    if storage == "bf16":
        return np.ascontiguousarray(value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    return np.ascontiguousarray(value.to(TORCH_DTYPES[storage]).numpy())


def write_samples(
    out_dir: str | Path,
    samples: Iterable[Mapping[str, Any]],
    *,
    size_limit: int | str = "64mb",
    extra_files: Mapping[str, str] | None = None,
    layout: Layout = LATENTS,
    compression: str | None = None,
) -> Path:
    """Write `samples` (dicts with the required columns of `layout`; by default the latent
    columns of `schema.REQUIRED_COLUMNS`) to `out_dir`.

    Optional columns ('bucket', 'seed', ...) are written when the first sample has them. Array values
    may be numpy arrays or torch tensors of any float dtype. Latents are stored as fp16; the text
    columns (`prompt_embeds`, `pooled`) in the dtype of the first sample's, bit for bit
    (schema.TEXT_STORAGE), so that training feeds exactly what the encoders produced.
    `extra_files` ({file name: text}) are written next to index.json before the rename.

    index.json records the `schema.SHARD_HASH` of every shard file, which the loader checks before
    it reads the shard. `compression` (`data.compression`: e.g. 'zstd', 'zstd:7', None = none)
    stores only compressed shards (`shard.NNNNN.mds.zstd`); readers decompress each on first use.

    Raises FileExistsError if `out_dir` exists: delete it or pick another path.
    """
    check_compression(compression)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OutputExistsError(f"Dataset directory {str(out_dir)!r} already exists; delete it or choose another output path.")
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        raise InputError(f"No samples to write to {str(out_dir)!r}: an empty dataset cannot be read by streaming.")
    columns = {**layout.required, **{k: v for k, v in layout.optional.items() if k in first}}
    storage = {k: text_storage(first[k]) for k in TEXT_COLUMNS if k in first}
    columns.update({k: TEXT_STORAGE[v] for k, v in storage.items()})
    latent_columns = [k for k, v in columns.items() if v.startswith("ndarray") and k not in storage]

    # replace=False: fails if another process created out_dir meanwhile
    with atomic_directory(out_dir) as tmp_dir:
        with MDSWriter(
            out=str(tmp_dir), columns=columns, size_limit=size_limit, hashes=[SHARD_HASH], compression=compression
        ) as writer:
            for i, sample in enumerate(itertools.chain([first], samples)):
                missing = [k for k in columns if k not in sample]
                if missing:
                    raise InputError(
                        f"Sample {i} written to {str(out_dir)!r} lacks column(s) {missing}; every sample needs {list(columns)}."
                    )
                row = {k: sample[k] for k in columns}
                row.update({k: _to_fp16(sample[k]) for k in latent_columns})
                row.update({k: _to_stored(sample[k], v) for k, v in storage.items()})
                writer.write(row)
        for name, text in (extra_files or {}).items():
            (tmp_dir / name).write_text(text)
    return out_dir


def write_negative_prompt(root: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> Path:
    """ROOT/negative_prompt.safetensors: the empty prompt's (L, D) and (P,) conditioning, of the
    same form as the shards' `prompt_embeds`, as fp32 (exact for fp32, bf16 and fp16 values);
    temporary name, then rename."""

    path = Path(root) / NEGATIVE_PROMPT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {
        "prompt_embeds": prompt_embeds.detach().float().cpu().contiguous(),
        "pooled": pooled.detach().float().cpu().contiguous(),
    }
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def _random_samples(
    num_samples: int,
    latent_shape: tuple[int, int, int],
    text_len: int,
    text_dim: int,
    pooled_dim: int,
    seed: int,
    bucket: str | None,
    layout: Layout,
):
    rng = np.random.default_rng(seed)
    c, h, w = latent_shape
    for i in range(num_samples):
        sample = {
            "latent": rng.standard_normal(latent_shape, dtype=np.float32),  # (C, h, w)
            "prompt_embeds": rng.standard_normal((text_len, text_dim), dtype=np.float32),  # (L, D)
            "pooled": rng.standard_normal((pooled_dim,), dtype=np.float32),  # (P,)
            "prompt": f"random sample {i}",
        }
        if "condition" in layout.required:  # image-conditioned tasks (schema.INPAINT, schema.EDIT)
            sample["condition"] = rng.standard_normal(latent_shape, dtype=np.float32)  # (C, h, w)
        if "mask" in layout.required:
            sample["mask"] = (rng.random((1, h, w)) < 0.5).astype(np.float32)  # (1, h, w)
        if bucket is not None:
            sample["bucket"] = bucket
        yield sample


def write_random_latents(
    out_dir: str | Path,
    *,
    num_samples: int,
    latent_shape: tuple[int, int, int] = (4, 32, 32),
    text_len: int = 8,
    text_dim: int = 64,
    pooled_dim: int = 32,
    seed: int = 0,
    bucket: str | None = None,
    size_limit: int | str = "64mb",
    layout: Layout = LATENTS,
) -> Path:
    """Write the built-in "random latents" dataset (standard-normal tensors) for tests, of
    `layout` (an image-conditioned one adds standard-normal conditions and random 0/1 masks).

    Deterministic in its arguments. If `out_dir` already holds a valid dataset written with the
    same arguments this does nothing, so every rank (or a resumed run) may call it; the
    parameters live in `out_dir/random_latents.params` for that check.
    """
    if text_len < 1:
        raise InputError(f"text_len must be at least 1, got {text_len}.")
    params = {
        "num_samples": num_samples,
        "latent_shape": list(latent_shape),
        "text_len": text_len,
        "text_dim": text_dim,
        "pooled_dim": pooled_dim,
        "seed": seed,
        "bucket": bucket,
        "size_limit": size_limit,
        **({"layout": layout.name} if layout is not LATENTS else {}),  # earlier outputs keep their params
    }
    out_dir = Path(out_dir)
    if not out_dir.exists():
        samples = _random_samples(num_samples, tuple(latent_shape), text_len, text_dim, pooled_dim, seed, bucket, layout)
        try:
            return write_samples(
                out_dir,
                samples,
                size_limit=size_limit,
                layout=layout,
                extra_files={RANDOM_PARAMS_FILE: json.dumps(params, indent=1)},
            )
        except OSError:
            if not out_dir.exists():
                raise
            # Another rank finished first; fall through and check that its data matches ours.
    _check_random_params(out_dir, params)
    return out_dir


def _check_random_params(out_dir: Path, params: dict[str, Any]) -> None:
    params_file = out_dir / RANDOM_PARAMS_FILE
    if not params_file.is_file():
        raise OutputExistsError(
            f"{str(out_dir)!r} exists but was not written by "
            f"write_random_latents (no {RANDOM_PARAMS_FILE}); delete it or "
            f"choose another output path."
        )
    validate_mds_dir(out_dir)
    found = json.loads(params_file.read_text())
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise OutputExistsError(
            f"{str(out_dir)!r} holds random latents written with other "
            f"parameters (key: (on disk, requested)): {diff}. Delete it or "
            f"choose another output path."
        )
