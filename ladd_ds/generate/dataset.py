"""The crash-safe, multi-rank dataset writer of the data-generating commands (`synth`, `encode`,
`pairs`): each command gives its jobs and a `make_rows` that turns a batch of them into columns;
this module does the rest.

Each rank takes a disjoint part of the jobs (index % world), in batches of one bucket, encodes
their text once, and commits the rows it gets back in parts of `Generation.part_size` samples
(write_part). Every part is an MDS directory written under a temporary name and renamed when
complete, so a crash loses at most the part in progress and a re-run skips every sample found in
a complete part. When all jobs are done, rank 0 checks that every sample is present exactly once
(made or skipped), writes each bucket's index over its parts (OUT/<bucket>/index.json), the
negative prompt's embeddings and OUT/manifest.json, each replaced atomically (finalize).

Re-runs (ladd_ds.generate.state): prepare_output checks or records the output's settings before
any model is built; the same command on a finished output does nothing; with jobs appended it
makes only the new samples and finalizes again; after a kill (finalize included) it continues
to the same dataset. A re-run with other settings or changed inputs stops and names what changed.

Also the set-up the commands share: start_generation (the process group and the output folder
claimed), generation_buckets (synth.buckets checked against the teacher's patch size and the
latent codec), model_identity (what a model's weights are) and common_settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ladd_ds.config import Config, config_to_dict
from ladd_ds.core.errors import InputError
from ladd_ds.core.host_memory import peak_rss_increase
from ladd_ds.core.outputs import check_output
from ladd_ds.data.manifest import read_manifest
from ladd_ds.data.prompts import PromptJob, bucket_name, input_digest
from ladd_ds.data.schema import LATENTS, MANIFEST_FILE, NEGATIVE_PROMPT_FILE, Layout
from ladd_ds.data.writer import write_negative_prompt, write_samples
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed import faults
from ladd_ds.distributed.claim import claim_folder
from ladd_ds.distributed.ranks import all_reduce_sum, barrier, broadcast_object, is_main, print0, rank, world_size
from ladd_ds.generate.state import (
    PART_FILE,
    PART_STATS,
    check_or_write_state,
    check_unchanged,
    completed_samples,
    drop_stale_skips,
    record_skipped,
    remove_stale_temporaries,
    skipped_samples,
    still_done,
    write_text_atomic,
)
from ladd_ds.models.codec import codec_factor
from ladd_ds.models.registry import is_folder, resolve_model_config

MANIFEST = MANIFEST_FILE


def check_buckets(buckets: list[list[int]], *, patch_size: int, codec_factor: int) -> list[str]:
    names = []
    for i, hw in enumerate(buckets):
        if len(hw) != 2:
            raise InputError(f"synth.buckets[{i}]: expected [height, width], got {hw}")
        h, w = hw
        step = codec_factor * patch_size
        if h <= 0 or w <= 0 or h % step or w % step:
            raise InputError(
                f"synth.buckets[{i}] = {h}x{w}: height and width must be positive multiples of {step} "
                f"(latent codec factor {codec_factor} x patch size {patch_size})"
            )
        names.append(bucket_name(h, w))
    return names


def my_batches(jobs: list[PromptJob], batch_size: int) -> list[list[PromptJob]]:
    """This rank's jobs (index % world == rank), grouped by bucket into batches."""
    mine = [j for j in jobs if j.index % world_size() == rank()]
    batches = []
    for bucket in sorted({j.bucket for j in mine}):
        in_bucket = [j for j in mine if j.bucket == bucket]
        batches += [in_bucket[i : i + batch_size] for i in range(0, len(in_bucket), batch_size)]
    return batches


def write_part(
    out: Path,
    *,
    jobs: list[PromptJob],
    rows: list[dict],
    encoded,
    compression: str | None = None,
    layout: Layout = LATENTS,
    stats: dict | None = None,
) -> Path:
    """Commit one part: the `rows` (the columns a generator made) of `jobs`, with their text
    conditioning `encoded` [(prompt_embeds, pooled)], prompt, bucket and index; `stats` (numbers
    summed over parts by finalize) in PART_STATS."""
    # Named by its first sample and a digest of all its keys: unique even when keys are not
    # positions (encode's image paths) and a re-run's parts start at the same position.
    part = out / jobs[0].bucket / f"part-{jobs[0].index:09d}-{input_digest([j.key for j in jobs])[:8]}"
    samples = [
        {
            **rows[i],
            "prompt_embeds": encoded[i][0],
            "pooled": encoded[i][1],
            "prompt": job.prompt,
            "bucket": job.bucket,
            "index": job.index,
        }
        for i, job in enumerate(jobs)
    ]
    extra = {PART_FILE: json.dumps([[j.key, j.digest] for j in jobs])}
    if stats:
        extra[PART_STATS] = json.dumps(stats)
    return write_samples(part, samples, extra_files=extra, compression=compression, layout=layout)


def summed_part_stats(out: Path) -> dict[str, float]:
    """The PART_STATS of every committed part, summed key by key."""
    total: dict[str, float] = {}
    for path in sorted(out.glob(f"*/part-*/{PART_STATS}")):
        for key, value in json.loads(path.read_text()).items():
            total[key] = total.get(key, 0.0) + value
    return total


def model_identity(spec: str, seed: int) -> str:
    """What the teacher's weights are, cheaply and the same on every rank: a preset with its
    seed, or a digest of a folder's weight files (read once, on rank 0, and broadcast)."""

    if not is_folder(spec):
        return f"preset {spec}, seed {seed}"
    identity = [None]
    if is_main():
        h = hashlib.sha256()
        for path in sorted((Path(spec) / "transformer").glob("*.safetensors")):
            h.update(path.name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        identity = [f"folder weights sha256 {h.hexdigest()[:16]}"]
    return broadcast_object(identity[0])


def write_bucket_index(bucket_dir: Path) -> int:
    """OUT/<bucket>/index.json over the bucket's committed parts (what streaming's merge_index
    writes, but replacing an existing index atomically); returns the bucket's sample count."""
    shards = []
    for part_index in sorted(bucket_dir.glob("part-*/index.json")):
        for shard in json.loads(part_index.read_text())["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part_index.parent.name}/{shard[key]['basename']}"
            shards.append(shard)
    write_text_atomic(bucket_dir / "index.json", json.dumps({"version": 2, "shards": shards}))
    return sum(shard["samples"] for shard in shards)


def finalize(out: Path, jobs: list[PromptJob], cfg: Config, source: dict, section: str = "synth") -> dict:
    """Rank 0: every sample exactly once (made or skipped), each bucket's index and the manifest,
    each replaced atomically, so that a kill anywhere in here is undone by running it again.
    `section`: the config section of the generating command, recorded in the manifest."""
    done = completed_samples(out)
    expected = {j.key for j in jobs}
    written = {k for k, d in done.items() if not d.skipped}
    missing, extra = sorted(expected - still_done(done, jobs)), sorted(written - expected)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} samples missing after generation (e.g. {missing[:5]})")
    if extra:
        raise InputError(
            f"{out} holds {len(extra)} samples whose prompts or images are no longer in the input file "
            f"(e.g. {extra[:5]}): restore those lines to finish this output, or pass a new --out"
        )
    counts = {}
    for bucket_dir in sorted(p for p in out.iterdir() if p.is_dir() and any(p.glob("part-*/index.json"))):
        faults.maybe_die("kill_in_finalize", len(counts) + 1)  # tests: a kill between two buckets' indexes
        counts[bucket_dir.name] = write_bucket_index(bucket_dir)
    skipped = skipped_samples(out, jobs)
    manifest = {
        "samples": sum(counts.values()),
        "buckets": counts,
        "inputs": input_digest(sorted(expected)),
        "skipped": skipped,
        "stats": summed_part_stats(out),
        "source": source,
        section: config_to_dict(cfg)[section],
        "text": config_to_dict(cfg)["text"],
        "codec": config_to_dict(cfg)["codec"],
        "negative_prompt": NEGATIVE_PROMPT_FILE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def finished_manifest(out: Path, jobs: list[PromptJob], done: set[str]) -> dict | None:
    """The manifest of a finished output made from exactly these jobs, each of them `done`
    (written, or skipped with the same inputs and files): nothing left to do. Else None."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("inputs") != input_digest(sorted(j.key for j in jobs)):
        return None
    if any(j.key not in done for j in jobs):  # a stale skip (its file changed) is retried
        return None
    return manifest


def prepare_output(out: Path, jobs: list[PromptJob], name: str, settings: dict) -> dict | None:
    """Before any model is built: check (rank 0) or record the output's settings, check that the
    finished samples' inputs did not change, and return the manifest when nothing is left to do.
    Rank 0 also drops the skips this run supersedes, before any rank reads what is done."""
    if is_main():
        check_or_write_state(out, name, settings)
        remove_stale_temporaries(out)
        drop_stale_skips(out, jobs)
    barrier()
    inputs = {"synth": "prompts", "encode": "captions or images", "pairs": "prompts or preference lines"}[name]
    done = completed_samples(out)
    check_unchanged(out, done, jobs, inputs)
    manifest = finished_manifest(out, jobs, still_done(done, jobs))
    if manifest is not None:
        print0(f"{name}: {out} is complete ({manifest['samples']} samples): nothing to do")
    return manifest


@dataclass(frozen=True, kw_only=True)
class Generation:
    """How a command feeds generate_dataset: its name, the config section its settings come
    from, the batch of jobs per `make_rows` call, the samples per part and the dataset layout."""

    name: str
    section: str
    batch_size: int
    part_size: int
    layout: Layout = LATENTS
    # rows of one part -> numbers to sum over parts (finalize: manifest["stats"]); None: none
    part_stats: Callable[[list[dict]], dict] | None = None


def generate_dataset(
    cfg: Config, *, jobs: list[PromptJob], out: Path, make_rows, source: dict, text, gen: Generation
) -> dict | None:
    """The crash-safe, multi-rank part of `synth`, `encode` and `pairs`: each rank produces its
    batches with `make_rows(batch, its (prompt_embeds, pooled))` -> ({column: one value per made
    job (a tensor of B' rows, or a list)}, the B' jobs made, [(job, reason) skipped]) and commits
    them in parts (skipped samples in skip records); rank 0 finalizes.

    With `lockstep` ranks (a ZeRO-3 teacher) every rank must run the same number of model calls,
    so ranks with fewer batches repeat their last one and drop the result."""

    name = gen.name
    done = still_done(completed_samples(out), jobs)
    todo = [j for j in jobs if j.key not in done]
    # Every rank takes its view of what is done before any rank commits a part: a fast rank's new
    # part would otherwise count as done on a slower one (seen as a wrong "already done" count).
    barrier()
    batches = my_batches(todo, gen.batch_size)
    print0(f"{name}: {len(jobs)} samples, {len(done)} already done, {len(todo)} to generate on {world_size()} ranks")
    counts = torch.zeros(world_size(), dtype=torch.float64)
    counts[rank()] = len(batches)
    rounds = int(all_reduce_sum(counts).max()) if source.get("lockstep") else len(batches)
    device = ds.device()

    with peak_rss_increase() as memory:
        _generate_parts(cfg, jobs, out, make_rows, text, gen, batches, rounds=rounds, todo=len(todo), device=device)
    if memory.increase is not None:
        print0(f"{name}: host memory rose by {memory.increase / 2**20:.1f} MiB at its peak while generating (rank 0)")
    barrier()
    if is_main():
        embeds, pooled = text.encode([""], device)  # for the teacher's guidance during training (ladd.distill_cfg)
        write_negative_prompt(out, embeds[0], pooled[0])
        manifest = finalize(out, jobs, cfg, source, gen.section)
        print0(f"{name}: wrote {manifest['samples']} samples to {out}: {manifest['buckets']}")
        if manifest["skipped"]:
            print0(f"{name}: skipped {len(manifest['skipped'])} (listed in {out / MANIFEST} under 'skipped'):")
            for item in manifest["skipped"][:20]:
                print0(f"  {item['file'] or item['key']}: {item['reason']}")
            if len(manifest["skipped"]) > 20:
                print0(f"  ... and {len(manifest['skipped']) - 20} more")
        return manifest
    return None


def _generate_parts(
    cfg: Config, jobs, out: Path, make_rows, text, gen: Generation, batches, *, rounds: int, todo: int, device
) -> None:
    """This rank's batches through `make_rows`, committed in parts of gen.part_size (one bucket each)."""
    name = gen.name
    bar = tqdm(total=todo, desc=name, disable=not is_main(), unit="sample", dynamic_ncols=True)
    pending: list[tuple[PromptJob, dict, tuple]] = []  # (job, row, (prompt_embeds, pooled))
    parts_written = skips_written = 0
    for k in range(rounds):
        if k >= len(batches):  # keep the ZeRO-3 forwards in step with the other ranks
            make_rows(batches[-1] if batches else jobs[:1], None)
            continue
        batch = batches[k]
        # Encoded once: stored in the encoders' dtype, bit for bit what the teacher is fed here
        # and what training and sampling feed.
        embeds, pooled = text.encode([j.prompt for j in batch], device)
        columns, made, skipped = make_rows(batch, (embeds, pooled))
        if skipped:
            skips_written += 1
            record_skipped(out, rank=rank(), serial=skips_written, skipped=skipped)
        position = {j.key: i for i, j in enumerate(batch)}
        for i, job in enumerate(made):
            r = position[job.key]
            pending.append((job, {c: _row_value(v[i]) for c, v in columns.items()}, (embeds[r].cpu(), pooled[r].cpu())))
        bar.update(len(batch) * world_size())  # ranks advance in step: an estimate of the total
        next_bucket = batches[k + 1][0].bucket if k + 1 < len(batches) else None
        if pending and (len(pending) >= gen.part_size or next_bucket != batch[0].bucket):  # a part holds one bucket
            parts_written += 1
            faults.maybe_die("kill", parts_written)  # tests: a crash before this part is committed
            rows = [p[1] for p in pending]
            stats = gen.part_stats(rows) if gen.part_stats else None
            write_part(
                out,
                jobs=[p[0] for p in pending],
                rows=rows,
                encoded=[p[2] for p in pending],
                compression=cfg.data.compression,
                layout=gen.layout,
                stats=stats,
            )
            pending = []
    bar.close()


def _row_value(value):
    """One job's value of a column: a tensor row on the host in fp32 (the writer stores its
    dtype), a 0-d tensor as a number, anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.float().cpu()
    return value


def generation_buckets(cfg: Config) -> tuple[dict, list[str]]:
    """The teacher's model config and synth.buckets' names, each bucket checked against the
    teacher's patch size and the latent codec's factor."""

    model_cfg = resolve_model_config(cfg.model.teacher)
    return model_cfg, check_buckets(
        cfg.synth.buckets, patch_size=model_cfg["patch_size"], codec_factor=codec_factor(cfg.codec.vae)
    )


def common_settings(cfg: Config) -> dict:
    """Settings of every generating command that shape its samples: text conditioning, latent
    codec and precision."""
    d = config_to_dict(cfg)
    return {"text": d["text"], "codec": d["codec"], "precision": cfg.deepspeed.precision}


def start_generation(cfg: Config, out: Path) -> torch.device:
    """Collective set-up of a generating command (synth, encode, pairs): the process group, and
    the output directory claimed by rank 0 (ladd_ds.distributed.claim): refused when it holds
    anything but a dataset of ladd-ds or when another job writes it, else created, locked for this
    job and marked. Returns this rank's device."""

    ds.init_distributed(cfg.deepspeed.dist_backend, cfg.health.collective_timeout_s)
    claim_folder(out, lambda folder: check_output(folder, "dataset"), kind="dataset", source=None, what="dataset")
    return ds.device()
