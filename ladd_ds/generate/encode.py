"""`ladd-ds encode`: real images with captions -> the same shards as `synth`, through the VAE.

Each image goes to the bucket of nearest aspect ratio, is resized to cover it and center-cropped
(the usual multi-aspect recipe; EXIF orientation applied first), encoded to normalized latents,
and written with its caption's text embeddings. Needed for inpainting and for the paper's
real-vs-synthetic comparison.

A sample's key is its image's path relative to the image folder, so editing the caption file
(removing a line, appending images) never renames the samples already written. An image that
is missing, does not decode, is truncated, or is too small or too elongated for the buckets
(data.min_image_side, data.max_aspect_ratio, checked from its header) is skipped: recorded with
its reason (manifest.json, "skipped", and the closing summary), and nothing already encoded is
lost. A re-run retries a skip only when its file changed (size or modification time) or the
limits did (generate/state.py).

`--task inpaint`: each image also gets a random mask (generate/masks.py; its seed from
synth.seed and the image's key, stored as the sample's `seed`) and its condition, in the
schema.INPAINT layout. `--task edit`: the caption file is JSONL of {"source", "target",
"prompt"} triples; the target is the latent, the source the condition (schema.EDIT), both cut
to the source's bucket. The task and mask kinds are recorded: a re-run with others is refused.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import torch
from PIL import Image

from ladd_ds.config import Config
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.noise import derive_seed
from ladd_ds.data.images import (  # noqa: F401 (displayed_size, image_bucket, nearest_bucket: re-exported)
    UNREADABLE,
    ImageLimits,
    checked_bucket,
    displayed_size,
    image_bucket,
    load_cropped,
    nearest_bucket,
)
from ladd_ds.data.prompts import PromptJob, input_digest, numbered_lines, parse_bucket
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.generate.dataset import (
    Generation,
    common_settings,
    generate_dataset,
    generation_buckets,
    prepare_output,
    start_generation,
)
from ladd_ds.generate.masks import DEFAULT_KINDS, check_kinds, random_mask
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.sampling import condition_columns, load_text_encoder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """(file, caption) pairs from JSONL ({"file", "caption"}) or "file<TAB>caption" lines."""
    path = Path(path)
    pairs = []
    for n, line in numbered_lines(path, what="caption file", expected="captions"):
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


def file_state(path: Path) -> tuple[list | None, str]:
    """([size, mtime in ns] or None when missing, why it cannot be a captioned image or ""), from
    one stat: every rank stats every captioned file at every start."""
    try:
        st = path.stat()
    except OSError:
        return None, "file not found"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return [st.st_size, st.st_mtime_ns], f"not an image file name (expected one of {sorted(IMAGE_SUFFIXES)})"
    return [st.st_size, st.st_mtime_ns], ""


def skip_stamp(stamps: list, limits: ImageLimits | None) -> str:
    """The job's stamp (PromptJob.stamp): its files' [size, mtime] and the image limits, so that
    a changed file, or other limits, make its skip stale and a re-run retries it. Not the
    sample's digest: a written sample is not redone when a file is only touched or copied."""
    return input_digest(stamps, dataclasses.asdict(limits) if limits else None)


def check_some_found(jobs: list[PromptJob], captions, images: Path) -> None:
    """A caption file none of whose images is in the folder is a wrong --images (or paths), not a
    dataset of skips."""
    if jobs and all("file not found" in j.skip for j in jobs):
        raise MissingInputError(
            f"{captions}: none of its {len(jobs)} lines has its images in {images} (the first: {jobs[0].key}, "
            f"{jobs[0].skip}): check --images and the paths in the caption file"
        )


def load_image_jobs(
    images: str | Path,
    captions: str | Path,
    buckets: list[str],
    seed: int,
    mine=lambda index: True,
    limits: ImageLimits | None = None,
) -> list[PromptJob]:
    """One job per caption line, keyed by the image's relative path. Headers are read only for
    this rank's jobs (`mine(index)`; the others keep an empty bucket: another rank makes them); an
    image that is missing, whose header does not decode, or whose size is outside `limits` gets
    no bucket and its reason (job.skip), and is skipped when its turn comes. Every rank stats
    every file: the stamps (size, mtime) decide on every rank alike which skips are stale."""
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    jobs, seen = [], set()
    for index, (file, caption) in enumerate(read_captions(captions)):
        path = images / file
        key = path.relative_to(images).as_posix()
        if key in seen:
            raise InputError(f"{captions}: image {file} is captioned twice; keep one line per image")
        seen.add(key)
        stamp, why = file_state(path)
        bucket = ""
        if mine(index):
            bucket, why = (UNREADABLE, why) if why else checked_bucket(path, buckets, limits)
        # The bucket follows from the image. "": a missing file's digest is unknown, and not
        # compared (a written sample whose file was deleted since stays as it is).
        digest = input_digest(caption, stamp[0]) if stamp else ""
        jobs.append(
            PromptJob(
                index, caption, bucket, seed, image=str(path), key=key, digest=digest, stamp=skip_stamp([stamp], limits), skip=why
            )
        )
    check_some_found(jobs, captions, images)
    return jobs


def read_edit_triples(path: str | Path) -> list[tuple[str, str, str]]:
    """(source, target, instruction) from JSONL lines {"source", "target", "prompt"}."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise InputError(f'{path}: editing data needs a .jsonl file of {{"source", "target", "prompt"}} lines')
    triples = []
    for n, line in numbered_lines(path, what="edit file", expected="edit triples"):
        try:
            r = json.loads(line)
            triples.append((str(r["source"]), str(r["target"]), str(r["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: expected a JSON object with 'source', 'target' and 'prompt'") from None
    return triples


def load_edit_jobs(
    images: str | Path,
    captions: str | Path,
    buckets: list[str],
    seed: int,
    mine=lambda index: True,
    limits: ImageLimits | None = None,
) -> list[PromptJob]:
    """One job per (source, target, instruction) line, keyed by both images' relative paths; the
    bucket is the source's (the target is cut to it too). `image`: the source, `other_image`: the
    target. Skips as load_image_jobs, for either image (both headers are read for this rank's jobs)."""
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    jobs, seen = [], set()
    for index, (source, target, prompt) in enumerate(read_edit_triples(captions)):
        paths = [images / source, images / target]
        key = " -> ".join(p.relative_to(images).as_posix() for p in paths)
        if key in seen:
            raise InputError(f"{captions}: the edit {key} is listed twice; keep one line per (source, target)")
        seen.add(key)
        roles = [("source", source, paths[0]), ("target", target, paths[1])]
        stamps, problems = zip(*(file_state(path) for path in paths))
        bucket, why = "", next((f"{role} {file}: {w}" for (role, file, _), w in zip(roles, problems) if w), "")
        if mine(index) and not why:  # both headers: the target is cut to the source's bucket
            checks = [checked_bucket(path, buckets, limits) for _, _, path in roles]
            bucket = checks[0][0]
            why = next((f"{role} {file}: {w}" for (role, file, _), (_, w) in zip(roles, checks) if w), "")
        if mine(index) and why:
            bucket = UNREADABLE
        digest = input_digest(prompt, stamps[0][0], stamps[1][0]) if all(stamps) else ""  # "": as load_image_jobs
        jobs.append(
            PromptJob(
                index,
                prompt,
                bucket,
                seed,
                image=str(paths[0]),
                key=key,
                digest=digest,
                other_image=str(paths[1]),
                stamp=skip_stamp(list(stamps), limits),
                skip=why,
            )
        )
    check_some_found(jobs, captions, images)
    return jobs


def mask_seed(seed: int, key: str) -> int:
    """The random mask's seed of the image keyed `key` (its relative path: the same mask whatever
    the line's position), stored as the sample's `seed`: random_mask(h, w, seed) gives it back."""
    return derive_seed(seed, key, "inpaint-mask") & 0x7FFFFFFF


def run_encode(
    cfg: Config, *, images: str, captions: str, out: str | Path, task: str = "t2i", mask_kinds: tuple[str, ...] | None = None
) -> dict | None:
    """Encode captioned images (t2i); with task "inpaint" also a random mask per image and its
    condition (schema.INPAINT); with task "edit" (source, instruction, target) triples, the
    target as the latent and the source as the condition (schema.EDIT)."""

    out = Path(out)
    kinds = check_kinds(mask_kinds or DEFAULT_KINDS)
    model_cfg, buckets = generation_buckets(cfg)
    load_jobs = load_edit_jobs if task == "edit" else load_image_jobs
    limits = ImageLimits.for_buckets(buckets, min_side=cfg.data.min_image_side, max_aspect=cfg.data.max_aspect_ratio)
    # The inputs are read before the output is claimed: a caption file that cannot be used leaves
    # no trace at --out. Every rank reads them (rank and world size from the launcher's variables).
    jobs = load_jobs(images, captions, buckets, cfg.synth.seed, mine=lambda i: i % world_size() == rank(), limits=limits)
    device = start_generation(cfg, out)
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
        if batch[0].bucket == UNREADABLE:  # skipped from the header or file alone (load_image_jobs)
            return {}, [], [(j, j.skip) for j in batch]
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
            masks = torch.stack([random_mask(h, w, seed=seed, kinds=kinds) for seed in seeds]).to(device)  # (B', 1, H, W)
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
    gen = Generation(name="encode", section="synth", batch_size=s.batch_size, part_size=s.part_size, layout=TASK_LAYOUTS[task])
    return generate_dataset(cfg, jobs=jobs, out=out, make_rows=make_rows, source=source, text=text, gen=gen)
