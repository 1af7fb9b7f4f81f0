"""`ladd-ds encode`: real images with captions -> the same shards as `synth`, through the VAE.

Each image goes to the bucket of nearest aspect ratio, is resized to cover it and center-cropped
(the usual multi-aspect recipe; EXIF orientation applied first), encoded to normalized latents,
and written with its caption's text embeddings. Needed for inpainting and for the paper's
real-vs-synthetic comparison.

A sample's key is its image's path relative to the image folder, so editing the caption file
(removing a line, appending images) never renames the samples already written. An image that
does not decode, or is truncated, is skipped: recorded with its reason (manifest.json, "skipped",
and the closing summary), never retried by a re-run, and nothing already encoded is lost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.data.prompts import PromptJob, input_digest, numbered_lines, parse_bucket
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.generate.synth import (
    Generation,
    common_settings,
    generate_dataset,
    generation_buckets,
    prepare_output,
    start_generation,
)
from ladd_ds.sampling import load_text_encoder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """(file, caption) pairs from JSONL ({"file", "caption"}) or "file<TAB>caption" lines."""
    path = Path(path)
    pairs = []
    for n, line in numbered_lines(path, "caption file", "captions"):
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                pairs.append((str(record["file"]), str(record["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{n}: expected a JSON object with 'file' and 'caption'") from None
        else:
            file, sep, caption = line.partition("\t")
            if not sep:
                raise InputError(f"{path}:{n}: expected 'file<TAB>caption'")
            pairs.append((file, caption))
    return pairs


def nearest_bucket(width: int, height: int, buckets: list[str]) -> str:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(parse_bucket(b)[1] / parse_bucket(b)[0]) - ratio))


EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees: width and height swap
UNREADABLE = "(unreadable)"  # the bucket of an image whose header does not decode


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown, after its EXIF orientation."""
    w, h = im.size
    return (h, w) if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def load_image_jobs(
    images: str | Path, captions: str | Path, buckets: list[str], seed: int, mine=lambda index: True
) -> list[PromptJob]:
    """One job per caption line, keyed by the image's relative path. Headers are read only for
    this rank's jobs (`mine(index)`; the others keep an empty bucket: another rank makes them); an
    image whose header does not decode gets no bucket and is skipped when its turn comes."""
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    jobs, seen = [], set()
    for index, (file, caption) in enumerate(read_captions(captions)):
        path = images / file
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise MissingInputError(f"{captions}: image {file} not found in {images} (or not an image: {sorted(IMAGE_SUFFIXES)})")
        key = path.relative_to(images).as_posix()
        if key in seen:
            raise InputError(f"{captions}: image {file} is captioned twice; keep one line per image")
        seen.add(key)
        bucket = ""
        if mine(index):
            try:
                with Image.open(path) as im:
                    bucket = nearest_bucket(*displayed_size(im), buckets)
            except (OSError, ValueError, Image.DecompressionBombError):
                bucket = UNREADABLE
        digest = input_digest(caption, path.stat().st_size)  # the bucket follows from the image
        jobs.append(PromptJob(index, caption, bucket, seed, image=str(path), key=key, digest=digest))
    return jobs


def load_cropped(path: str, height: int, width: int) -> torch.Tensor:
    """Apply the EXIF orientation, resize to cover (height, width), center-crop; (3, H, W) in [-1, 1]."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = max(width / im.width, height / im.height)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)  # (3, H, W)


def run_encode(cfg: Config, images: str, captions: str, out: str | Path) -> dict | None:
    from ladd_ds.models.codec import load_codec
    from ladd_ds.models.conditioning import latent_channels

    out = Path(out)
    model_cfg, buckets = generation_buckets(cfg)
    device = start_generation(cfg, out)
    jobs = load_image_jobs(images, captions, buckets, cfg.synth.seed, mine=lambda i: i % world_size() == rank())
    settings = {"images": str(Path(images).resolve()), "buckets": buckets, **common_settings(cfg)}
    finished = prepare_output(out, jobs, "encode", settings)
    if finished is not None:
        return finished
    codec = load_codec(cfg.codec.vae, latent_channels(model_cfg), seed=cfg.codec.seed).to(device)
    text = load_text_encoder(cfg, device)

    def make_rows(batch: list[PromptJob], conditioning):  # the conditioning is not needed here
        if batch[0].bucket == UNREADABLE:
            return {}, [], [(j, "cannot identify the image file (not a decodable image)") for j in batch]
        h, w = parse_bucket(batch[0].bucket)
        made, pixels, skipped = [], [], []
        for job in batch:
            try:
                pixels.append(load_cropped(job.image, h, w))
                made.append(job)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append((job, f"does not decode: {e}"))
        if not made:
            return {}, [], skipped
        latents = codec.encode(torch.stack(pixels).to(device))  # (B', C, H/f, W/f)
        return {"latent": latents, "seed": [j.seed for j in made]}, made, skipped

    source = {"kind": "encoded images", "images": str(images), "vae": cfg.codec.vae}
    s = cfg.synth
    return generate_dataset(cfg, jobs, out, make_rows, source, text, Generation("encode", "synth", s.batch_size, s.part_size))
