"""Checks of a local MDS data path that `ladd-ds train` and `ladd-ds dpo` run before any model
is built: every bucket of a synth/encode root is there with the manifest's sample count, every
bucket can fill a global batch (or is dropped, with `data.drop_small_buckets`), and the stored
shapes fit the model. Without them these show up after the engines are built, as streaming's
"Stream with index 0 does not have an adequate number of samples", a bucket silently left out,
or a shape error in the first forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json

from ladd_ds.core.errors import InputError
from ladd_ds.data.loader import bucket_dirs
from ladd_ds.data.manifest import read_manifest
from ladd_ds.data.schema import INDEX_FILE, MANIFEST_FILE, Layout, validate_mds_dir
from ladd_ds.models.conditioning import latent_channels


@dataclass(frozen=True)
class DataPlan:
    """What the loader reads from a local data path."""

    path: Path
    buckets: list[Path]  # the kept bucket directories of a multi-bucket root; [] for one dataset
    num_samples: int  # in what is kept
    dropped: dict[str, int]  # buckets smaller than one global batch: name -> samples

    @property
    def datasets(self) -> list[Path]:
        return self.buckets or [self.path]


def plan_mds_data(path: str | Path, layout: Layout, global_batch: int, batch_note: str, drop_small: bool) -> DataPlan:
    """Check the datasets of local `path` and keep those that can fill a global batch of
    `global_batch` samples (`batch_note` says how it is made up, for the messages).

    Streaming builds every global batch from one bucket (per-stream batching), so a bucket with
    fewer samples never yields one and stops training at its first iteration. With `drop_small`
    such buckets are left out (DataPlan.dropped) instead of refused; a single dataset cannot be.
    """
    path = Path(path)
    buckets = bucket_dirs(path)
    sizes = {d: validate_mds_dir(d, layout)["num_samples"] for d in buckets or [path]}
    if not buckets:
        if sizes[path] < global_batch:
            raise InputError(
                f"data.path {path} holds {sizes[path]} samples, fewer than one global batch of {global_batch} "
                f"({batch_note}): write more samples or lower data.micro_batch_size / optim.grad_accum"
            )
        return DataPlan(path, [], sizes[path], {})

    listed = (read_manifest(path) or {}).get("buckets") or {}
    for d, n in sizes.items():
        if d.name in listed and int(listed[d.name]) != n:
            raise InputError(
                f"data.path {path}: bucket {d.name!r} holds {n} samples ({d / INDEX_FILE}), its {MANIFEST_FILE} "
                f"says {listed[d.name]}: the bucket is incomplete or was rewritten after the manifest; copy the "
                "complete directory again or regenerate the data"
            )
    small = {d.name: n for d, n in sizes.items() if n < global_batch}
    if small and not drop_small:
        raise InputError(
            f"data.path {path}: bucket(s) {small} (name: samples) hold fewer samples than one global batch of "
            f"{global_batch} ({batch_note}), and every batch comes from one bucket. Write more samples into them, "
            "lower data.micro_batch_size / optim.grad_accum, or set data.drop_small_buckets: true to train on the "
            "other buckets"
        )
    kept = [d for d in buckets if d.name not in small]
    if not kept:
        raise InputError(
            f"data.drop_small_buckets: every bucket of data.path {path} holds fewer samples than one global batch "
            f"of {global_batch} ({batch_note}): {small} (name: samples); nothing is left to train on. Write more "
            "samples or lower data.micro_batch_size / optim.grad_accum"
        )
    return DataPlan(path, kept, sum(sizes[d] for d in kept), small)


def first_sample(root: Path) -> dict:
    """The first sample of the (validated) dataset at `root`, decoded by streaming's shard reader:
    one small read, no StreamingDataset (no shared memory, no workers)."""
    return read_samples(root, 1)[0]


def read_samples(root: Path, count: int) -> list[dict]:
    """The first `count` samples (all, if it holds fewer) of the validated dataset at `root`, in
    stored order, decoded by streaming's shard readers: no StreamingDataset (no shared memory, no
    workers). Columns as streaming decodes them (numpy arrays; loader.stored_tensor converts)."""
    out: list[dict] = []
    for shard in json.loads((root / INDEX_FILE).read_text())["shards"]:
        if len(out) >= count:
            break
        reader = reader_from_json(str(root), None, shard)
        wanted = min(count - len(out), int(shard["samples"]))
        if (root / shard["raw_data"]["basename"]).is_file():
            out += [reader.get_item(i) for i in range(wanted)]
            continue
        # Only the compressed shard is there (validate_mds_dir allows it): decompress it in memory.
        data = decompress(shard["compression"], (root / shard["zip_data"]["basename"]).read_bytes())
        offsets = np.frombuffer(data[4 : 4 + 4 * (wanted + 1)], np.uint32)  # after the sample count
        out += [reader.decode_sample(data[offsets[i] : offsets[i + 1]]) for i in range(wanted)]
    return out


def check_stored_shapes(plan: DataPlan, layout: Layout, model_cfg: dict, model_name: str, *, key: str = "data.path") -> None:
    """Refuse data whose stored shapes (one sample of each dataset) cannot feed the model of
    config `model_cfg` (model.teacher = `model_name`): latent channels, latent size against the
    patch size, text and pooled widths. `key`: the config key that named the data."""
    model = f"model.teacher {model_name}"
    for root in plan.datasets:
        where = f"{key} {plan.path}" + (f", bucket {root.name!r}" if plan.buckets else "")
        sample = first_sample(root)
        for column in layout.latent_columns:
            shape = tuple(sample[column].shape)
            if len(shape) != 3:
                raise InputError(f"{where}: column {column!r} stores shape {shape}, expected (channels, height, width)")
            channels = 1 if column == "mask" else latent_channels(model_cfg)
            if shape[0] != channels:
                raise InputError(
                    f"{where}: column {column!r} stores {shape[0]} channels (shape {shape}), but {model} has "
                    f"{latent_channels(model_cfg)} latent channels, so {column!r} must have {channels}: write the data "
                    "with the latent codec of this model, or train the model the data was written for"
                )
            patch = model_cfg["patch_size"]
            if shape[1] % patch or shape[2] % patch:
                raise InputError(
                    f"{where}: column {column!r} stores latents of {shape[1]}x{shape[2]}, not divisible by "
                    f"{model}'s patch_size={patch}: use bucket sizes whose latents are multiples of it"
                )
        for column, model_key in (("prompt_embeds", "joint_attention_dim"), ("pooled", "pooled_projection_dim")):
            width = sample[column].shape[-1]
            if width != model_cfg[model_key]:
                raise InputError(
                    f"{where}: column {column!r} stores width {width} (shape {tuple(sample[column].shape)}), but "
                    f"{model} has {model_key}={model_cfg[model_key]}: write the data with the text encoders "
                    "this model was trained with (the `text` section), or train the model the data was written for"
                )
