"""Preference pairs for DPO, as a multi-bucket MDS root of the `schema.PAIRS` layout.

`ladd-ds pairs --config C`: for every prompt of pairs.prompts, sample pairs.samples_per_prompt
(K) images from pairs.model (anything `ladd-ds sample --model` takes; default model.teacher),
score them with the configured scorer (in batches) and keep the best and the worst as (winner,
loser). The latents are the sampler's own, not re-encoded images. A prompt whose K scores differ
by less than pairs.min_score_gap (or not at all) gives no pair; it is recorded as skipped.

`ladd-ds pairs --config C --import-pairs FILE.jsonl --images DIR` instead encodes an existing
preference set ({"prompt", "winner", "loser"} image files per line) through the latent codec of
`ladd-ds encode` (codec.vae, e.g. SD3's VAE), in the bucket of pairs.buckets nearest the winner's
aspect ratio. An image that does not decode skips its pair (recorded with the reason).

Both run on the dataset writer of `ladd-ds synth` and `encode` (ladd_ds.generate.dataset): any
number of ranks (prompt i on rank i % world), parts committed atomically, crash-safe and resumable
(the same command continues; on a finished output it does nothing; appended lines are added),
and the settings recorded and checked. Memory holds one part of pairs, not the set; the jobs
(prompt, file names, a digest) of every line are kept, about a few hundred bytes per pair.
OUT/pairs.json summarises the output.

A scorer is built by calling the callable named in pairs.scorer ("package.module:callable") with
pairs.scorer_args; it maps (images (N, 3, H, W) in [0, 1], prompts) to N scores, higher is
better. The demo's scorer is ladd_ds.demo.scoring:digit_confidence.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Protocol

import torch
from PIL import Image

from ladd_ds.config import Config, ConfigError, config_to_dict
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.noise import derive_seed
from ladd_ds.data.prompts import PromptJob, bucket_name, input_digest, load_prompt_jobs, parse_bucket
from ladd_ds.data.schema import PAIRS
from ladd_ds.distributed.ranks import is_main, rank, world_size
from ladd_ds.generate.dataset import (
    Generation,
    common_settings,
    generate_dataset,
    model_identity,
    prepare_output,
    start_generation,
)
from ladd_ds.generate.encode import IMAGE_SUFFIXES, UNREADABLE, displayed_size, load_cropped, nearest_bucket
from ladd_ds.generate.state import write_text_atomic
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.sampling import decode_images, load_sampling_model, load_text_encoder, sample_latents

SUMMARY = "pairs.json"


class Scorer(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def load_scorer(spec: str | None, args: dict) -> Scorer:
    if not spec:
        raise ConfigError("pairs.scorer: name the scorer factory, e.g. ladd_ds.demo.scoring:digit_confidence")
    module_name, _, attr = spec.partition(":")
    try:
        factory: Callable = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"pairs.scorer: cannot import {spec!r} ({e})") from None
    try:
        return factory(**args)
    except TypeError as e:
        raise ConfigError(f"pairs.scorer_args: {spec} does not accept {sorted(args)} ({e})") from None


def pair_from_scores(scores: torch.Tensor) -> tuple[int, int]:
    """Indices of the best and the worst of K scores (the first of equals)."""
    return int(torch.argmax(scores)), int(torch.argmin(scores))


def pairs_buckets(cfg: Config) -> list[str]:
    p = cfg.pairs
    return [bucket_name(h, w) for h, w in (p.buckets or [[p.height, p.width]])]


def write_summary(out: Path, manifest: dict, extra: dict) -> dict:
    """OUT/pairs.json from the finished manifest (rank 0), replaced atomically."""
    stats = manifest.get("stats", {})
    summary = {
        "pairs": manifest["samples"],
        "buckets": manifest["buckets"],
        "skipped": len(manifest["skipped"]),
        **(
            {"mean_score_gap": stats["score_gap_sum"] / manifest["samples"]}
            if "score_gap_sum" in stats and manifest["samples"]
            else {}
        ),
        **extra,
    }
    if is_main():
        write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2))
    return summary


def make_pairs(cfg: Config, out: str | Path | None = None) -> dict | None:
    """Sample, score and write the pairs on every rank; returns the summary (also OUT/pairs.json)
    on rank 0, None on the others."""

    p = cfg.pairs
    out = Path(out or p.out)
    if not p.prompts:
        raise ConfigError("pairs.prompts: a text file with one prompt per line (or JSONL with 'prompt')")
    spec = str(p.model or cfg.model.teacher)
    jobs = load_prompt_jobs(p.prompts, pairs_buckets(cfg), None, p.seed)
    scorer = load_scorer(p.scorer, p.scorer_args)
    device = start_generation(cfg, out)
    pair_settings = {
        k: v for k, v in config_to_dict(cfg)["pairs"].items() if k not in ("out", "prompts", "batch_size", "part_size", "model")
    }
    settings = {
        "model": spec,
        "model_identity": model_identity(spec, cfg.run.seed),
        "pairs": pair_settings,
        **common_settings(cfg),
    }
    extra = {"prompts": len(jobs), "model": spec, "scorer": p.scorer, "samples_per_prompt": p.samples_per_prompt}
    extra |= {"steps": p.steps, "guidance_scale": p.guidance_scale}
    finished = prepare_output(out, jobs, "pairs", settings)
    if finished is not None:
        return write_summary(out, finished, extra) if is_main() else None
    sm = load_sampling_model(spec, device=device, precision=cfg.deepspeed.precision)
    if p.shift is not None:
        sm.shift = p.shift
    k = p.samples_per_prompt

    def make_rows(batch: list[PromptJob], conditioning):
        h, w = parse_bucket(batch[0].bucket)
        prompts = [j.prompt for j in batch for _ in range(k)]
        seeds = [derive_seed(p.seed, j.index, n, "pairs") for j in batch for n in range(k)]
        latents = sample_latents(
            sm, prompts, seeds, height=h, width=w, steps=p.steps, cfg=p.guidance_scale, batch_size=p.batch_size
        )
        with torch.no_grad():
            scores = torch.as_tensor(scorer(decode_images(sm.codec, latents), prompts), dtype=torch.float64).cpu()
        if scores.shape != (len(prompts),):
            raise InputError(f"pairs.scorer {p.scorer} returned shape {tuple(scores.shape)} for {len(prompts)} images")
        columns = {"latent_w": [], "latent_l": [], "score_w": [], "score_l": []}
        made, skipped = [], []
        for n, job in enumerate(batch):
            s = scores[n * k : (n + 1) * k]
            best, worst = pair_from_scores(s)
            gap = float(s[best] - s[worst])
            if gap <= 0 or gap < p.min_score_gap:
                skipped.append((job, f"score gap {gap:.4g} of its {k} samples is below pairs.min_score_gap {p.min_score_gap:g}"))
                continue
            made.append(job)
            columns["latent_w"].append(latents[n * k + best])
            columns["latent_l"].append(latents[n * k + worst])
            columns["score_w"].append(float(s[best]))
            columns["score_l"].append(float(s[worst]))
        return columns, made, skipped

    def gap_sum(rows: list[dict]) -> dict:
        return {"score_gap_sum": sum(r["score_w"] - r["score_l"] for r in rows)}

    source = {"kind": "scored preference pairs", "model": spec, "scorer": p.scorer}
    gen = Generation(
        name="pairs",
        section="pairs",
        batch_size=max(1, p.batch_size // k),
        part_size=p.part_size,
        layout=PAIRS,
        part_stats=gap_sum,
    )
    manifest = generate_dataset(cfg, jobs=jobs, out=out, make_rows=make_rows, source=source, text=sm.text, gen=gen)
    return write_summary(out, manifest, extra) if manifest is not None else None


def read_preference_jobs(path: str | Path, images: Path, buckets: list[str]) -> list[PromptJob]:
    """One job per line of a {"prompt", "winner", "loser"} JSONL file, read line by line, keyed
    by its two image paths and its prompt. The winner's header is read (for its bucket) and both
    images' existence checked only for this rank's lines (index % world)."""

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"preference file {path} does not exist")
    jobs, lines, seen = [], {}, set()
    with path.open("rb") as f:  # read line by line (a set of millions of pairs), decoded as UTF-8
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "winner", "loser")):
                raise InputError(f"{path}:{n}: expected an object with string 'prompt', 'winner' and 'loser' (image files)")
            key = f"{record['winner']}|{record['loser']}|{input_digest(record['prompt'])[:8]}"
            if key in seen:
                raise InputError(f"{path}:{n}: the same pair and prompt as line {lines[key]}; keep one line per pair")
            seen.add(key)
            lines[key] = n
            index = len(jobs)
            winner, loser, bucket, digest = images / record["winner"], images / record["loser"], "", ""
            if index % world_size() == rank():
                for role, f_ in (("winner", winner), ("loser", loser)):
                    if not f_.is_file() or f_.suffix.lower() not in IMAGE_SUFFIXES:
                        raise MissingInputError(
                            f"{path}:{n}: {role} image {record[role]} not found in {images} (or not an image: "
                            f"{sorted(IMAGE_SUFFIXES)})"
                        )
                try:
                    with Image.open(winner) as im:
                        bucket = nearest_bucket(*displayed_size(im), buckets)
                except (OSError, ValueError, Image.DecompressionBombError):
                    bucket = UNREADABLE
                digest = input_digest(record["prompt"], winner.stat().st_size, loser.stat().st_size)
            jobs.append(
                PromptJob(index, record["prompt"], bucket, 0, image=str(winner), key=key, digest=digest, other_image=str(loser))
            )
    if not jobs:
        raise InputError(f"preference file {path} has no pairs")
    return jobs


def import_pairs(cfg: Config, *, preferences: str | Path, images: str | Path, out: str | Path | None = None) -> dict | None:
    """Encode an existing preference set (images + winner/loser labels) into pair shards, on
    every rank; returns the summary on rank 0, None on the others."""

    p = cfg.pairs
    out, images = Path(out or p.out), Path(images)
    if not images.is_dir():
        raise MissingInputError(f"image folder {images} does not exist")
    buckets = pairs_buckets(cfg)
    codec = load_codec(cfg.codec.vae, latent_channels(resolve_model_config(cfg.model.teacher)), seed=cfg.codec.seed)
    bad = [b for b in buckets if any(v % codec.factor for v in parse_bucket(b))]
    if bad:
        raise ConfigError(f"pairs.buckets (or pairs.height/width): {bad} are not multiples of the codec factor {codec.factor}")
    jobs = read_preference_jobs(preferences, images, buckets)
    device = start_generation(cfg, out)
    settings = {"preferences": str(Path(preferences).resolve()), "images": str(images.resolve()), "buckets": buckets}
    finished = prepare_output(out, jobs, "pairs", {**settings, **common_settings(cfg)})
    extra = {"source": str(preferences), "images": str(images), "codec": cfg.codec.vae}
    if finished is not None:
        return write_summary(out, finished, extra) if is_main() else None
    codec = codec.to(device)
    text = load_text_encoder(cfg, device)

    def make_rows(batch: list[PromptJob], conditioning):
        if batch[0].bucket == UNREADABLE:
            return {}, [], [(j, "cannot identify the winner image file (not a decodable image)") for j in batch]
        h, w = parse_bucket(batch[0].bucket)
        made, winners, losers, skipped = [], [], [], []
        for job in batch:
            try:
                winner, loser = load_cropped(job.image, h, w), load_cropped(job.other_image, h, w)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append((job, f"does not decode: {e}"))
                continue
            made.append(job)
            winners.append(winner)
            losers.append(loser)
        if not made:
            return {}, [], skipped
        with torch.no_grad():
            columns = {
                "latent_w": codec.encode(torch.stack(winners).to(device)),
                "latent_l": codec.encode(torch.stack(losers).to(device)),
            }
        return columns, made, skipped

    source = {"kind": "imported preference pairs", "preferences": str(preferences), "vae": cfg.codec.vae}
    gen = Generation(name="pairs", section="pairs", batch_size=p.batch_size, part_size=p.part_size, layout=PAIRS)
    manifest = generate_dataset(cfg, jobs=jobs, out=out, make_rows=make_rows, source=source, text=text, gen=gen)
    return write_summary(out, manifest, extra) if manifest is not None else None
