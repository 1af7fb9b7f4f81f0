"""The images an evaluation makes and reads: prompt jobs per bucket with their seeds, each rank's
contiguous block of them, reference image files, and cheap identities of model and weights files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.noise import derive_seed
from ladd_ds.core.outputs import absolute
from ladd_ds.data.prompts import bucket_name, numbered_lines, prompt_record
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.sampling import parse_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Job:
    """One image every cell makes: prompt `prompt_index` (its `number`-th image) at `bucket`."""

    prompt_index: int
    number: int
    prompt: str
    bucket: str
    seed: int


def files_stamp(path: str | Path) -> str:
    """What a model or weights file is, cheaply: its path with every file's size and mtime (a
    digest of the bytes of an 8B teacher would read 16 GB)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256(str(absolute(path)).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_jobs(prompts_file: str, *, sizes: list[str] | None, per_prompt: int, seed: int, default: str) -> list[Job]:
    """Every image of the evaluation, bucket by bucket in order of first appearance. `--sizes`:
    each prompt at each size; otherwise at its JSONL 'bucket' or `default`. Image j of prompt i
    has seed derive_seed(seed, i, j) (a JSONL 'seed' replaces `seed` for its prompt), the same
    for every model."""
    if per_prompt < 1:
        raise InputError(f"--per-prompt {per_prompt}: must be >= 1")
    path = Path(prompts_file)
    lines = numbered_lines(path, what="prompt file", expected="prompts (one per line, or JSONL with a 'prompt')")
    jobs = []
    for i, (n, line) in enumerate(lines):
        record = prompt_record(path, n, line)
        buckets = sizes or [record.get("bucket") or default]
        for bucket in buckets:
            height, width = parse_size(bucket, what="--sizes" if sizes else f"{path}:{n}: bucket")
            base = record.get("seed", seed)
            if not isinstance(base, int):
                raise InputError(f"{path}:{n}: 'seed' must be an integer")
            key = (base, i) if "seed" not in record else (base,)
            jobs += [Job(i, j, record["prompt"], bucket_name(height, width), derive_seed(*key, j)) for j in range(per_prompt)]
    order = list(dict.fromkeys(j.bucket for j in jobs))
    return sorted(jobs, key=lambda j: (order.index(j.bucket), j.prompt_index, j.number))


def by_bucket(jobs: list[Job]) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = {}
    for job in jobs:
        out.setdefault(job.bucket, []).append(job)
    return out


def my_block(items: list, *, of_rank: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous block of `items` (ranks in order concatenate to `items`)."""
    r, w = rank() if of_rank is None else of_rank, world_size() if world is None else world
    start, end = len(items) * r // w, len(items) * (r + 1) // w
    return items[start:end]


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"--reference {folder} is not a folder; pass a folder of reference images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise InputError(f"--reference {folder}: {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); FD needs at least 2")
    return files


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) in [0, 1]."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"--reference: cannot read {path} ({e}); remove it or convert it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def same_size_groups(files: list[Path], size: int) -> list[list[Path]]:
    """Runs of consecutive image files of one size, at most `size` long (a batch is one tensor)."""
    groups: list[list[Path]] = []
    last = None
    for path in files:
        with Image.open(path) as im:
            shape = im.size
        if groups and len(groups[-1]) < size and shape == last:
            groups[-1].append(path)
        else:
            groups.append([path])
        last = shape
    return groups
