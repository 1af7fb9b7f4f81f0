"""`ladd-ds synth`: the teacher generates the LADD training latents from prompts.

Each rank takes a disjoint part of the prompts (index % world), samples them bucket by bucket
with classifier-free guidance through diffusers' StableDiffusion3Pipeline (flow-matching Euler
scheduler with the configured shift, `output_type="latent"`), and writes them in parts of
`synth.part_size` samples. Every part is an MDS directory written under a temporary name and
renamed when complete, so a crash loses at most the part in progress and a re-run skips every
prompt index found in a complete part. When all prompts are done, rank 0 checks that every index
is present exactly once, merges each bucket's parts into OUT/<bucket>/index.json and writes
OUT/manifest.json. A sample is reproducible from (prompt index, seed) alone: its initial noise
comes from a generator seeded with the prompt's seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ladd_ds.config import Config, config_to_dict
from ladd_ds.core.errors import InputError
from ladd_ds.data.prompts import PromptJob, bucket_name, load_prompt_jobs, parse_bucket
from ladd_ds.data.schema import MANIFEST_FILE, NEGATIVE_PROMPT_FILE
from ladd_ds.data.writer import write_negative_prompt, write_samples
from ladd_ds.distributed import faults
from ladd_ds.distributed.ranks import barrier, is_main, print0, rank, world_size
from ladd_ds.sampling import PRECISIONS, TeacherSampler, load_text_encoder

PART_FILE = "part.indices"  # not *.json: streaming's merge_index reads every json as an index
MANIFEST = MANIFEST_FILE


def check_buckets(buckets: list[list[int]], patch_size: int, codec_factor: int) -> list[str]:
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


def completed_indices(out: Path) -> dict[int, Path]:
    """Prompt index -> the complete part holding it (parts are renamed into place when done)."""
    done: dict[int, Path] = {}
    for part_file in sorted(out.glob(f"*/part-*/{PART_FILE}")):
        for index in json.loads(part_file.read_text()):
            if index in done:
                raise RuntimeError(f"prompt {index} is in two parts: {done[index].parent} and {part_file.parent}")
            done[index] = part_file
    return done


def my_batches(jobs: list[PromptJob], batch_size: int) -> list[list[PromptJob]]:
    """This rank's jobs (index % world == rank), grouped by bucket into batches."""
    mine = [j for j in jobs if j.index % world_size() == rank()]
    batches = []
    for bucket in sorted({j.bucket for j in mine}):
        in_bucket = [j for j in mine if j.bucket == bucket]
        batches += [in_bucket[i : i + batch_size] for i in range(0, len(in_bucket), batch_size)]
    return batches


def write_part(out: Path, jobs: list[PromptJob], latents: list[torch.Tensor], encoded, compression: str | None = None) -> Path:
    part = out / jobs[0].bucket / f"part-{jobs[0].index:09d}"
    samples = [
        {
            "latent": latents[i],
            "prompt_embeds": encoded[i][0],
            "pooled": encoded[i][1],
            "prompt": job.prompt,
            "bucket": job.bucket,
            "seed": job.seed,
            "index": job.index,
        }
        for i, job in enumerate(jobs)
    ]
    return write_samples(part, samples, extra_files={PART_FILE: json.dumps([j.index for j in jobs])}, compression=compression)


def fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def finalize(out: Path, jobs: list[PromptJob], cfg: Config, source: dict) -> dict:
    """Rank 0: every prompt exactly once, one merged index per bucket, and the manifest."""
    from streaming.base.util import merge_index

    logging.getLogger("streaming").setLevel(logging.ERROR)  # merge_index warns per existing dir
    done = completed_indices(out)
    expected = {j.index for j in jobs}
    missing, extra = sorted(expected - set(done)), sorted(set(done) - expected)
    if missing or extra:
        raise RuntimeError(
            f"{out}: {len(missing)} prompts missing (e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})"
        )
    counts = {}
    for bucket in sorted({j.bucket for j in jobs}):
        merge_index(str(out / bucket), keep_local=True)
        counts[bucket] = sum(1 for j in jobs if j.bucket == bucket)
    manifest = {
        "samples": len(jobs),
        "buckets": counts,
        "source": source,
        "synth": config_to_dict(cfg)["synth"],
        "text": config_to_dict(cfg)["text"],
        "codec": config_to_dict(cfg)["codec"],
        "negative_prompt": NEGATIVE_PROMPT_FILE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)
    return manifest


def generate_dataset(cfg: Config, jobs: list[PromptJob], out: Path, make_latents, source: dict, text, name: str) -> dict | None:
    """The crash-safe, multi-rank part of `synth` and `encode`: each rank produces its batches with
    `make_latents(batch) -> (B, C, h, w)` and commits them in parts; rank 0 finalizes.

    With `lockstep` ranks (a ZeRO-3 teacher) every rank must run the same number of model calls,
    so ranks with fewer batches repeat their last one and drop the result."""
    from ladd_ds.distributed.engines import device as current_device
    from ladd_ds.distributed.ranks import all_reduce_sum

    s = cfg.synth
    done = completed_indices(out)
    todo = [j for j in jobs if j.index not in done]
    batches = my_batches(todo, s.batch_size)
    print0(f"{name}: {len(jobs)} samples, {len(done)} already done, {len(todo)} to generate on {world_size()} ranks")
    counts = torch.zeros(world_size(), dtype=torch.float64)
    counts[rank()] = len(batches)
    rounds = int(all_reduce_sum(counts).max()) if source.get("lockstep") else len(batches)
    device = current_device()

    bar = tqdm(total=len(todo), desc=name, disable=not is_main(), unit="sample", dynamic_ncols=True)
    pending: list[tuple[PromptJob, torch.Tensor, tuple]] = []  # (job, latent, (prompt_embeds, pooled))
    parts_written = 0
    for k in range(rounds):
        if k >= len(batches):  # keep the ZeRO-3 forwards in step with the other ranks
            make_latents(batches[-1] if batches else jobs[:1])
            continue
        batch = batches[k]
        latents = make_latents(batch)
        # Stored in the encoders' dtype, bit for bit what training and sampling feed.
        embeds, pooled = (x.cpu() for x in text.encode([j.prompt for j in batch], device))
        for i, job in enumerate(batch):
            pending.append((job, latents[i].float().cpu(), (embeds[i], pooled[i])))
        bar.update(len(batch) * world_size())  # ranks advance in step: an estimate of the total
        next_bucket = batches[k + 1][0].bucket if k + 1 < len(batches) else None
        if len(pending) >= s.part_size or next_bucket != batch[0].bucket:  # a part holds one bucket
            parts_written += 1
            faults.maybe_die("kill", parts_written)  # tests: a crash before this part is committed
            write_part(out, [p[0] for p in pending], [p[1] for p in pending], [p[2] for p in pending], cfg.data.compression)
            pending = []
    bar.close()
    barrier()
    if is_main():
        embeds, pooled = text.encode([""], device)  # for the teacher's guidance during training (ladd.distill_cfg)
        write_negative_prompt(out, embeds[0], pooled[0])
        manifest = finalize(out, jobs, cfg, source)
        print0(f"{name}: wrote {manifest['samples']} samples to {out}: {manifest['buckets']}")
        return manifest
    return None


def build_teacher(cfg: Config):
    """The teacher for sampling: replicated on every rank, or partitioned with ZeRO-3
    (synth.zero_stage = 3) for teachers too large for one device. Returns the transformer and
    its identity for the manifest (a weight fingerprint, or "partitioned (ZeRO-3)")."""
    from ladd_ds.distributed import engines as ds
    from ladd_ds.models.flow_model import build_flow_model

    if cfg.synth.zero_stage == 3:
        ds_config = ds.fill_ds_config(
            ds.load_template(cfg.deepspeed.teacher_config, "deepspeed.teacher_config"),
            micro_batch_size=cfg.synth.batch_size,
            grad_accum=1,
            world_size=world_size(),
            precision=cfg.deepspeed.precision,
        )
        teacher = build_flow_model(cfg.model.teacher, cfg.run.seed, ds_config=ds_config).transformer
        teacher.requires_grad_(False)
        return ds.frozen_engine(teacher, ds_config).module, "partitioned (ZeRO-3)"
    dtype = PRECISIONS[cfg.deepspeed.precision]
    teacher = build_flow_model(cfg.model.teacher, cfg.run.seed, device=ds.device(), dtype=dtype).transformer
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, fingerprint(teacher)


def generation_buckets(cfg: Config) -> tuple[dict, list[str]]:
    """The teacher's model config and synth.buckets' names, each bucket checked against the
    teacher's patch size and the latent codec's factor."""
    from ladd_ds.models.codec import codec_factor
    from ladd_ds.models.registry import resolve_model_config

    model_cfg = resolve_model_config(cfg.model.teacher)
    return model_cfg, check_buckets(cfg.synth.buckets, model_cfg["patch_size"], codec_factor(cfg.codec.vae))


def start_generation(cfg: Config, out: Path) -> torch.device:
    """Collective set-up of a generating command (synth, encode): the process group, the output
    directory (made by rank 0, seen by all after a barrier); returns this rank's device."""
    from ladd_ds.distributed import engines as ds

    ds.init_distributed(cfg.deepspeed.dist_backend, cfg.health.collective_timeout_s)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return ds.device()


def run_synth(cfg: Config, prompts: str, out: str | Path) -> dict | None:
    from ladd_ds.models.codec import codec_factor

    out = Path(out)
    s = cfg.synth
    factor = codec_factor(cfg.codec.vae)
    _, buckets = generation_buckets(cfg)
    jobs = load_prompt_jobs(prompts, buckets, s.bucket_weights, s.seed)
    device = start_generation(cfg, out)
    text = load_text_encoder(cfg, device)
    teacher, identity = build_teacher(cfg)
    sampler = TeacherSampler(teacher, text, s.shift, factor)

    def make_latents(batch: list[PromptJob]) -> torch.Tensor:
        h, w = parse_bucket(batch[0].bucket)
        prompts, seeds = [j.prompt for j in batch], [j.seed for j in batch]
        return sampler.sample(prompts, seeds, h, w, device, s.num_steps, s.guidance_scale)

    source = {"kind": "teacher samples", "model": cfg.model.teacher, "seed": cfg.run.seed, "fingerprint": identity}
    source["lockstep"] = s.zero_stage == 3
    return generate_dataset(cfg, jobs, out, make_latents, source, text, "synth")
