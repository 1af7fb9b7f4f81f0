"""Column layout of ladd_ds latent shards (MDS format of mosaicml-streaming) and its checker.

One sample holds what a student step needs without running the text encoders or the VAE:

    latent         fp16 (C, h, w)  VAE latent, already normalized (shift/scale applied)
    prompt_embeds  text (L, D)     SD3's text conditioning (77 CLIP + max_sequence_length T5
                                   tokens), the same L for every sample of a dataset
    pooled         text (P,)       pooled text embedding
    prompt         str             the caption, for logging and evaluation

Preference-pair shards (`ladd-ds pairs`, read by `ladd-ds dpo`) hold `latent_w` and `latent_l`
(the preferred and the rejected latent for the prompt) instead of `latent`; see `PAIRS`.

"text": the text columns keep the dtype the encoders produced them in, bit for bit
(`TEXT_STORAGE`): fp32 runs store float32, bf16 runs store the bfloat16 bits in a uint16 column
(MDS ndarrays cannot hold bfloat16), fp16 is float16. Latents are fp16. All are cast on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.precision import PRECISIONS, dtype_of

# Stored dtype of the text columns -> MDS encoding. bf16 is stored as its raw 16 bits.
TEXT_STORAGE: dict[str, str] = {"fp32": "ndarray:float32", "bf16": "ndarray:uint16", "fp16": "ndarray:float16"}
# The run precisions, and fp16: what a text encoder may hand over in its own dtype.
TORCH_DTYPES = {**{p: dtype_of(p) for p in PRECISIONS}, "fp16": torch.float16}
TEXT_COLUMNS = ("prompt_embeds", "pooled")
TEXT_ENCODING = "|".join(TEXT_STORAGE.values())  # any of them

# 'ndarray:float16' without a shape suffix stores the shape per sample (the loader checks the
# shapes of one batch); the few header bytes this costs do not matter.
REQUIRED_COLUMNS: dict[str, str] = {
    "latent": "ndarray:float16",
    "prompt_embeds": TEXT_ENCODING,
    "pooled": TEXT_ENCODING,
    "prompt": "str",
}
OPTIONAL_COLUMNS: dict[str, str] = {
    "bucket": "str",  # aspect bucket name, e.g. '1024x768'; one Stream per bucket
    "seed": "int",  # noise seed a teacher used to generate this latent
    "index": "int",  # position of the prompt in the prompt file that produced it (ladd-ds synth)
}

PAIR_COLUMNS: dict[str, str] = {
    "latent_w": "ndarray:float16",  # the preferred ("winner") latent
    "latent_l": "ndarray:float16",  # the rejected ("loser") latent, same shape
    "prompt_embeds": TEXT_ENCODING,
    "pooled": TEXT_ENCODING,
    "prompt": "str",
}
PAIR_OPTIONAL_COLUMNS: dict[str, str] = {
    "bucket": "str",
    "score_w": "float64",  # the scorer's values, for inspection
    "score_l": "float64",
    "index": "int",  # position of the prompt in the prompt file
}

INDEX_FILE = "index.json"
# `ladd-ds synth` / `encode`: the settings an output was started with (not *.json: see writer.py)
GENERATION_STATE_FILE = "generation.state"
# Hash of every shard file, stored in index.json by the writer and checked before a shard is read
# (ladd_ds.data.loader.CheckedStream): a fast non-cryptographic hash of xxhash, which streaming
# depends on. A dataset whose index names other algorithms is checked with one of those.
SHARD_HASH = "xxh64"
# Next to manifest.json in a synth/encode output root: the empty prompt's conditioning, of the
# same form as the shards' prompt_embeds, for classifier-free guidance of the teacher during training
# (`ladd.distill_cfg`). safetensors with `prompt_embeds` (L, D) and `pooled` (P,), fp32.
NEGATIVE_PROMPT_FILE = "negative_prompt.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Layout:
    """The columns of one kind of ladd_ds dataset."""

    name: str
    required: dict[str, str]
    optional: dict[str, str]
    latent_columns: tuple[str, ...]  # same-shape latents, stacked into the batch
    written_by: str  # for error messages


LATENTS = Layout("latent", REQUIRED_COLUMNS, OPTIONAL_COLUMNS, ("latent",), "ladd-ds synth / ladd-ds encode")
PAIRS = Layout("preference-pair", PAIR_COLUMNS, PAIR_OPTIONAL_COLUMNS, ("latent_w", "latent_l"), "ladd-ds pairs")
# Image-conditioned tasks (ladd_ds.models.conditioning): the target `latent` plus its condition at
# latent resolution. Inpainting: `condition` = the latent of the masked image (C, h, w), `mask`
# (1, h, w) = 1 where the model fills in. Editing: `condition` = the latent of the source image.
INPAINT_COLUMNS = {**REQUIRED_COLUMNS, "condition": "ndarray:float16", "mask": "ndarray:float16"}
EDIT_COLUMNS = {**REQUIRED_COLUMNS, "condition": "ndarray:float16"}
INPAINT = Layout(
    "inpainting",
    INPAINT_COLUMNS,
    OPTIONAL_COLUMNS,
    ("latent", "condition", "mask"),
    "ladd-ds synth --task inpaint / ladd-ds encode --task inpaint",
)
EDIT = Layout(
    "editing", EDIT_COLUMNS, OPTIONAL_COLUMNS, ("latent", "condition"), "ladd-ds synth --task edit / ladd-ds encode --task edit"
)
TASK_LAYOUTS = {"t2i": LATENTS, "inpaint": INPAINT, "edit": EDIT}


def _encoding_matches(found: str, expected: str) -> bool:
    # A fixed-shape ndarray column ('ndarray:float16:4,64,64') also satisfies 'ndarray:float16';
    # `expected` may list alternatives separated by "|".
    return any(found == e or found.startswith(e + ":") for e in expected.split("|"))


def validate_mds_dir(path: str | Path, layout: Layout = LATENTS) -> dict[str, Any]:
    """Check that `path` is a readable ladd_ds MDS dataset of `layout` and summarize it.

    `path` is either one MDSWriter output or a parent of several whose index.json was merged
    with `streaming.base.util.merge_index`; both have a top-level index.json listing every shard.

    Returns:
        {'path': str, 'num_samples': int, 'num_shards': int, 'columns': {name: encoding},
         'hashed': whether index.json records a hash of every shard file}

    Raises:
        FileNotFoundError: the directory, its index.json or a listed shard file is missing.
        ValueError: index.json is unreadable or a shard lacks a required column.
    """
    root = Path(path)
    if not root.is_dir():
        raise MissingInputError(
            f"Dataset directory {str(root)!r} does not exist. Write one with {layout.written_by} "
            f'(docs/data.md, "Datasets"), or point data.path at an existing one.'
        )
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        generation = next((d for d in (root, root.parent) if (d / GENERATION_STATE_FILE).is_file()), None)
        if generation is not None:  # never advise deleting resumable parts
            hint = (
                f"{generation} is an unfinished `ladd-ds synth` / `ladd-ds encode` output: run the same command "
                "again to finish it (it continues from the parts already written)."
            )
        elif any(root.glob(f"*/{INDEX_FILE}")):
            hint = (
                f"Its sub-directories have {INDEX_FILE} files: if they are parts of one dataset (the same columns "
                f"and shapes), merge them with streaming.base.util.merge_index({str(root)!r}, keep_local=True)."
            )
        elif any(root.glob("shard.*.mds*")):
            hint = "The write was probably interrupted: delete the directory and write it again."
        else:  # never advise deleting a folder that holds something else (e.g. the user's images)
            hint = "It is not an MDS dataset: point data.path at the output of ladd-ds synth / ladd-ds encode."
        raise MissingInputError(f"No {INDEX_FILE} in dataset directory {str(root)!r}. {hint}")

    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{str(index_path)!r} is not an MDS index ({err!r}). Delete the dataset directory and write it again."
        ) from err
    if not shards:
        raise InputError(f"{str(index_path)!r} lists no shards: the dataset is empty. Write at least one sample into it.")

    columns: dict[str, str] = {}
    hashed = True
    for shard in shards:
        shard_file = shard.get("raw_data", {}).get("basename", "?")
        if shard.get("format") != "mds":
            raise InputError(
                f"Shard {shard_file!r} in {str(root)!r} has format "
                f"{shard.get('format')!r}; ladd_ds reads only MDS shards "
                f"(written by streaming.MDSWriter or ladd_ds.data.write_samples)."
            )
        found = dict(zip(shard["column_names"], shard["column_encodings"]))
        for name, expected in {**layout.required, **layout.optional}.items():
            if name not in found:
                if name in layout.required:
                    raise InputError(
                        f"Dataset {str(root)!r}: shard {shard_file!r} is missing column "
                        f"{name!r}, so it is not a {layout.name} dataset (required columns: "
                        f"{list(layout.required)}). Write it with {layout.written_by}."
                    )
            elif not _encoding_matches(found[name], expected):
                raise InputError(
                    f"Dataset {str(root)!r}: shard {shard_file!r} stores column {name!r} as "
                    f"{found[name]!r}, expected {expected.replace('|', ' or ')!r}. Write it with "
                    f"ladd_ds.data.write_samples, which picks the encoding."
                )
        # A copy that stopped half-way has an index but not all shards; say so before streaming
        # fails deep inside a worker. Compressed datasets may hold only the zip form.
        files = [shard.get("raw_data"), shard.get("zip_data")]
        present = [f for f in files if f and (root / f["basename"]).is_file()]
        if not present:
            raise MissingInputError(
                f"Shard file {shard_file!r} listed in {str(index_path)!r} is missing. Copy the complete dataset directory again."
            )
        # A truncated or overwritten shard has another size than its index records (checking the
        # size is free; the hash check happens before the shard is first read, in the loader).
        for f in present:
            size = (root / f["basename"]).stat().st_size
            if f.get("bytes") is not None and size != int(f["bytes"]):
                raise InputError(
                    f"Shard file {str(root / f['basename'])!r} has {size} bytes, its index says {f['bytes']}: "
                    "the file is corrupted or truncated. Copy or regenerate the dataset."
                )
        hashed = hashed and all(f.get("hashes") for f in files if f)
        columns.update(found)

    return {
        "path": str(root),
        "num_samples": sum(int(shard["samples"]) for shard in shards),
        "num_shards": len(shards),
        "columns": columns,
        "hashed": hashed,
    }
