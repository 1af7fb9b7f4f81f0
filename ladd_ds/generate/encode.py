"""`ladd-ds encode`: real images with captions -> the same shards as `synth`, through the VAE.

Each image goes to the bucket of nearest aspect ratio, is resized to cover it and center-cropped
(the usual multi-aspect recipe), encoded to normalized latents, and written with its caption's
text embeddings. Needed for inpainting and for the paper's real-vs-synthetic comparison.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.data.prompts import PromptJob, numbered_lines, parse_bucket
from ladd_ds.generate.synth import generate_dataset, generation_buckets, start_generation
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


def load_image_jobs(images: str | Path, captions: str | Path, buckets: list[str], seed: int) -> list[PromptJob]:
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    jobs = []
    for index, (file, caption) in enumerate(read_captions(captions)):
        path = images / file
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise MissingInputError(f"{captions}: image {file} not found in {images} (or not an image: {sorted(IMAGE_SUFFIXES)})")
        with Image.open(path) as im:
            w, h = im.size
        jobs.append(PromptJob(index, caption, nearest_bucket(w, h, buckets), seed, image=str(path)))
    return jobs


def load_cropped(path: str, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width), center-crop; (3, H, W) in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(width / im.width, height / im.height)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)  # (3, H, W)


def run_encode(cfg: Config, images: str, captions: str, out: str | Path) -> dict | None:
    from ladd_ds.models.codec import load_codec

    out = Path(out)
    model_cfg, buckets = generation_buckets(cfg)
    jobs = load_image_jobs(images, captions, buckets, cfg.synth.seed)
    device = start_generation(cfg, out)
    codec = load_codec(cfg.codec.vae, model_cfg["in_channels"], seed=cfg.codec.seed).to(device)
    text = load_text_encoder(cfg, device)

    def make_latents(batch: list[PromptJob]) -> torch.Tensor:
        h, w = parse_bucket(batch[0].bucket)
        pixels = torch.stack([load_cropped(j.image, h, w) for j in batch]).to(device)  # (B, 3, H, W)
        return codec.encode(pixels)  # (B, C, H/f, W/f)

    source = {"kind": "encoded images", "images": str(images), "vae": cfg.codec.vae}
    return generate_dataset(cfg, jobs, out, make_latents, source, text, "encode")
