"""Preference pairs for DPO, as MDS shards of the `schema.PAIRS` layout.

`ladd-ds pairs --config C`: for every prompt of pairs.prompts, sample pairs.samples_per_prompt
(K) images from pairs.model (anything `ladd-ds sample --model` takes; default model.teacher),
score them with the configured scorer and keep the best and the worst as (winner, loser). The
latents are the sampler's own, not re-encoded images. Pairs whose scores differ by less than
pairs.min_score_gap are dropped.

`ladd-ds pairs --config C --import-pairs FILE.jsonl --images DIR` instead encodes an existing
preference set ({"prompt", "winner", "loser"} image files per line) through the latent codec of
`ladd-ds encode` (codec.vae, e.g. SD3's VAE), at pairs.height x pairs.width.

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
from tqdm import tqdm

from ladd_ds.config import Config, ConfigError
from ladd_ds.core.errors import InputError, MissingInputError, OutputExistsError
from ladd_ds.core.noise import derive_seed
from ladd_ds.data.prompts import bucket_name, numbered_lines
from ladd_ds.data.schema import PAIRS
from ladd_ds.data.writer import write_samples


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


def read_prompts(path: str | None) -> list[str]:
    if not path:
        raise ConfigError("pairs.prompts: a text file with one prompt per line")
    return [line.strip() for _, line in numbered_lines(path, "pairs.prompts: prompt file", "prompts")]


def pair_from_scores(scores: torch.Tensor) -> tuple[int, int]:
    """Indices of the best and the worst of K scores (the first of equals)."""
    return int(torch.argmax(scores)), int(torch.argmin(scores))


def make_pairs(cfg: Config, out: str | Path | None = None) -> dict:
    """Sample, score and write the pairs; returns a summary (also written as pairs.json)."""
    from ladd_ds.sampling import decode_images, load_sampling_model, sample_latents

    p = cfg.pairs
    out = Path(out or p.out)
    if out.exists():
        raise OutputExistsError(f"pairs output {out} already exists; delete it or choose another pairs.out")
    prompts = read_prompts(p.prompts)
    scorer = load_scorer(p.scorer, p.scorer_args)
    sm = load_sampling_model(p.model or cfg.model.teacher, precision=cfg.deepspeed.precision)
    if p.shift is not None:
        sm.shift = p.shift
    k = p.samples_per_prompt
    per_batch = max(1, p.batch_size // k)
    samples, dropped, gaps = [], 0, []
    bar = tqdm(total=len(prompts), desc="pairs", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(prompts), per_batch):
        chunk = list(range(start, min(start + per_batch, len(prompts))))
        batch_prompts = [prompts[i] for i in chunk for _ in range(k)]
        seeds = [derive_seed(p.seed, i, j, "pairs") for i in chunk for j in range(k)]
        latents = sample_latents(sm, batch_prompts, seeds, p.height, p.width, p.steps, p.guidance_scale, p.batch_size)
        with torch.no_grad():
            scores = torch.as_tensor(scorer(decode_images(sm.codec, latents), batch_prompts), dtype=torch.float64)
        if scores.shape != (len(batch_prompts),):
            raise InputError(f"pairs.scorer {p.scorer} returned shape {tuple(scores.shape)} for {len(batch_prompts)} images")
        embeds, pooled = sm.text.encode([prompts[i] for i in chunk])
        for n, i in enumerate(chunk):
            s = scores[n * k : (n + 1) * k]
            best, worst = pair_from_scores(s)
            gap = float(s[best] - s[worst])
            if gap <= 0 or gap < p.min_score_gap:
                dropped += 1
                continue
            gaps.append(gap)
            samples.append(
                {
                    "latent_w": latents[n * k + best].float().cpu(),
                    "latent_l": latents[n * k + worst].float().cpu(),
                    "prompt_embeds": embeds[n].cpu(),
                    "pooled": pooled[n].cpu(),
                    "prompt": prompts[i],
                    "bucket": bucket_name(p.height, p.width),
                    "score_w": float(s[best]),
                    "score_l": float(s[worst]),
                    "index": i,
                }
            )
        bar.update(len(chunk))
    bar.close()
    if not samples:
        raise InputError(f"no pair had a score gap of at least {p.min_score_gap}; nothing to write to {out}")
    summary = {
        "pairs": len(samples),
        "prompts": len(prompts),
        "dropped_ties": dropped,
        "mean_score_gap": sum(gaps) / len(gaps),
        "model": str(p.model or cfg.model.teacher),
        "scorer": p.scorer,
        "samples_per_prompt": k,
        "steps": p.steps,
        "guidance_scale": p.guidance_scale,
    }
    write_samples(
        out, samples, layout=PAIRS, extra_files={"pairs.json": json.dumps(summary, indent=2)}, compression=cfg.data.compression
    )
    return summary


def read_preference_file(path: str | Path) -> list[dict]:
    path = Path(path)
    records = []
    for n, line in numbered_lines(path, "preference file", "pairs"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "winner", "loser")):
            raise InputError(f"{path}:{n}: expected an object with string 'prompt', 'winner' and 'loser' (image files)")
        records.append(record)
    return records


def import_pairs(cfg: Config, preferences: str | Path, images: str | Path, out: str | Path | None = None) -> dict:
    """Encode an existing preference set (images + winner/loser labels) into pair shards."""
    from ladd_ds.generate.encode import IMAGE_SUFFIXES, load_cropped
    from ladd_ds.models.codec import load_codec
    from ladd_ds.models.registry import resolve_model_config
    from ladd_ds.sampling import load_text_encoder

    p = cfg.pairs
    out = Path(out or p.out)
    if out.exists():
        raise OutputExistsError(f"pairs output {out} already exists; delete it or choose another pairs.out")
    records = read_preference_file(preferences)
    images = Path(images)
    for n, r in enumerate(records, 1):
        for key in ("winner", "loser"):
            f = images / r[key]
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                raise MissingInputError(f"{preferences}:{n}: {key} image {r[key]} not found in {images} (or not an image)")
    codec = load_codec(cfg.codec.vae, resolve_model_config(cfg.model.teacher)["in_channels"], seed=cfg.codec.seed)
    if p.height % codec.factor or p.width % codec.factor:
        raise ConfigError(f"pairs.height/width must be multiples of the codec factor {codec.factor}")
    text = load_text_encoder(cfg, "cpu")
    samples = []
    for start in tqdm(range(0, len(records), p.batch_size), desc="import pairs", unit="batch", dynamic_ncols=True):
        chunk = records[start : start + p.batch_size]
        with torch.no_grad():
            latents = {
                key: codec.encode(torch.stack([load_cropped(str(images / r[key]), p.height, p.width) for r in chunk]))
                for key in ("winner", "loser")
            }
        embeds, pooled = text.encode([r["prompt"] for r in chunk])
        for n, r in enumerate(chunk):
            samples.append(
                {
                    "latent_w": latents["winner"][n],
                    "latent_l": latents["loser"][n],
                    "prompt_embeds": embeds[n].cpu(),
                    "pooled": pooled[n].cpu(),
                    "prompt": r["prompt"],
                    "bucket": bucket_name(p.height, p.width),
                    "index": start + n,
                }
            )
    summary = {"pairs": len(samples), "source": str(preferences), "images": str(images), "codec": cfg.codec.vae}
    write_samples(
        out, samples, layout=PAIRS, extra_files={"pairs.json": json.dumps(summary, indent=2)}, compression=cfg.data.compression
    )
    return summary
