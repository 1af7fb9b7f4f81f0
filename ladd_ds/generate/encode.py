"""`ladd-ds encode`: real images with captions -> the same shards as `synth`, through the VAE.

Each image goes to the bucket of nearest aspect ratio, is resized to cover it and center-cropped
(the usual multi-aspect recipe; EXIF orientation applied first), encoded to normalized latents,
and written with its caption's text embeddings. Needed for inpainting and for the paper's
real-vs-synthetic comparison.

A sample's key is its image's path relative to the image folder, so editing the caption file
(removing a line, appending images) never renames the samples already written. An image that
does not decode, or is truncated, is skipped: recorded with its reason (manifest.json, "skipped",
and the closing summary), never retried by a re-run, and nothing already encoded is lost.

`--task inpaint`: each image also gets a random mask (generate/masks.py; its seed from
synth.seed and the image's key, stored as the sample's `seed`) and its condition, in the
schema.INPAINT layout. `--task edit`: the caption file is JSONL of {"source", "target",
"prompt"} triples; the target is the latent, the source the condition (schema.EDIT), both cut
to the source's bucket. The task and mask kinds are recorded: a re-run with others is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.noise import derive_seed
from ladd_ds.data.images import UNREADABLE, displayed_size, image_bucket, load_cropped, nearest_bucket  # noqa: F401 (re-exported)
from ladd_ds.data.prompts import PromptJob, input_digest, numbered_lines, parse_bucket
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.generate.masks import DEFAULT_KINDS, check_kinds, random_mask
from ladd_ds.generate.synth import (
    Generation,
    common_settings,
    generate_dataset,
    generation_buckets,
    prepare_output,
    start_generation,
)
from ladd_ds.sampling import condition_columns, load_text_encoder

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
        bucket = image_bucket(path, buckets) if mine(index) else ""
        digest = input_digest(caption, path.stat().st_size)  # the bucket follows from the image
        jobs.append(PromptJob(index, caption, bucket, seed, image=str(path), key=key, digest=digest))
    return jobs


def read_edit_triples(path: str | Path) -> list[tuple[str, str, str]]:
    """(source, target, instruction) from JSONL lines {"source", "target", "prompt"}."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise InputError(f'{path}: editing data needs a .jsonl file of {{"source", "target", "prompt"}} lines')
    triples = []
    for n, line in numbered_lines(path, "edit file", "edit triples"):
        try:
            r = json.loads(line)
            triples.append((str(r["source"]), str(r["target"]), str(r["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: expected a JSON object with 'source', 'target' and 'prompt'") from None
    return triples


def load_edit_jobs(
    images: str | Path, captions: str | Path, buckets: list[str], seed: int, mine=lambda index: True
) -> list[PromptJob]:
    """One job per (source, target, instruction) line, keyed by both images' relative paths; the
    bucket is the source's (the target is cut to it too). `image`: the source, `other_image`: the target."""
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    jobs, seen = [], set()
    for index, (source, target, prompt) in enumerate(read_edit_triples(captions)):
        paths = [images / source, images / target]
        for file, path in zip((source, target), paths):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise MissingInputError(
                    f"{captions}: image {file} not found in {images} (or not an image: {sorted(IMAGE_SUFFIXES)})"
                )
        key = " -> ".join(p.relative_to(images).as_posix() for p in paths)
        if key in seen:
            raise InputError(f"{captions}: the edit {key} is listed twice; keep one line per (source, target)")
        seen.add(key)
        bucket = image_bucket(paths[0], buckets) if mine(index) else ""
        digest = input_digest(prompt, paths[0].stat().st_size, paths[1].stat().st_size)
        jobs.append(
            PromptJob(index, prompt, bucket, seed, image=str(paths[0]), key=key, digest=digest, other_image=str(paths[1]))
        )
    return jobs


def mask_seed(seed: int, key: str) -> int:
    """The random mask's seed of the image keyed `key` (its relative path: the same mask whatever
    the line's position), stored as the sample's `seed`: random_mask(h, w, seed) gives it back."""
    return derive_seed(seed, key, "inpaint-mask") & 0x7FFFFFFF


def run_encode(
    cfg: Config, images: str, captions: str, out: str | Path, task: str = "t2i", mask_kinds: tuple[str, ...] | None = None
) -> dict | None:
    """Encode captioned images (t2i); with task "inpaint" also a random mask per image and its
    condition (schema.INPAINT); with task "edit" (source, instruction, target) triples, the
    target as the latent and the source as the condition (schema.EDIT)."""
    from ladd_ds.models.codec import load_codec
    from ladd_ds.models.conditioning import latent_channels

    out = Path(out)
    kinds = check_kinds(mask_kinds or DEFAULT_KINDS)
    model_cfg, buckets = generation_buckets(cfg)
    device = start_generation(cfg, out)
    load_jobs = load_edit_jobs if task == "edit" else load_image_jobs
    jobs = load_jobs(images, captions, buckets, cfg.synth.seed, mine=lambda i: i % world_size() == rank())
    settings = {"images": str(Path(images).resolve()), "buckets": buckets, **common_settings(cfg)}
    if task != "t2i":  # recorded only for the new tasks: t2i outputs of earlier versions still resume
        settings["task"] = task
    if task == "inpaint":
        settings["mask_kinds"] = list(kinds)
    finished = prepare_output(out, jobs, "encode", settings)
    if finished is not None:
        return finished
    codec = load_codec(cfg.codec.vae, latent_channels(model_cfg), seed=cfg.codec.seed).to(device)
    text = load_text_encoder(cfg, device)

    @torch.no_grad()
    def make_rows(batch: list[PromptJob], conditioning):  # the conditioning is not needed here
        if batch[0].bucket == UNREADABLE:
            return {}, [], [(j, "cannot identify the image file (not a decodable image)") for j in batch]
        h, w = parse_bucket(batch[0].bucket)
        made, pixels, sources, skipped = [], [], [], []
        for job in batch:
            try:
                if task == "edit":  # the target is the latent, the source its condition
                    target, source = load_cropped(job.other_image, h, w), load_cropped(job.image, h, w)
                    pixels.append(target), sources.append(source)
                else:
                    pixels.append(load_cropped(job.image, h, w))
                made.append(job)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append((job, f"does not decode: {e}"))
        if not made:
            return {}, [], skipped
        pixels = torch.stack(pixels).to(device)  # (B', 3, H, W)
        latents = codec.encode(pixels)  # (B', C, H/f, W/f)
        seeds = [j.seed for j in made]
        if task == "inpaint":
            seeds = [mask_seed(cfg.synth.seed, j.key) for j in made]
            masks = torch.stack([random_mask(h, w, seed, kinds) for seed in seeds]).to(device)  # (B', 1, H, W)
            return {"latent": latents, **condition_columns(codec, task, pixels, masks), "seed": seeds}, made, skipped
        if task == "edit":
            return (
                {"latent": latents, **condition_columns(codec, task, torch.stack(sources).to(device)), "seed": seeds},
                made,
                skipped,
            )
        return {"latent": latents, "seed": seeds}, made, skipped

    source = {"kind": "encoded images", "images": str(images), "vae": cfg.codec.vae}
    if task != "t2i":
        source["task"] = task
    s = cfg.synth
    gen = Generation("encode", "synth", s.batch_size, s.part_size, layout=TASK_LAYOUTS[task])
    return generate_dataset(cfg, jobs, out, make_rows, source, text, gen)
