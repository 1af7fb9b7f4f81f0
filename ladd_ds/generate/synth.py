"""`ladd-ds synth`: the teacher generates the LADD training latents from prompts.

Each rank samples its prompts (index % world) bucket by bucket with classifier-free guidance
through diffusers' StableDiffusion3Pipeline (ladd_ds.sampling.TeacherSampler: flow-matching Euler
scheduler with the configured shift, `output_type="latent"`), the teacher replicated on every
rank or partitioned with ZeRO-3 (synth.zero_stage = 3).
The samples are written by the crash-safe, resumable dataset writer of every generating command
(ladd_ds.generate.dataset): parts of `synth.part_size` samples committed atomically, a manifest
when all prompts are done, re-runs that continue or stop naming what changed. A sample is
reproducible from (prompt, seed) alone: its initial noise comes from a generator seeded with the
prompt's seed.

`--task inpaint|edit` (an inpainting or editing teacher): the prompt file is JSONL of
{"prompt", "image"[, "mask"][, "seed"]} (paths relative to the file's folder); each line goes to
the bucket nearest its image's shape, the teacher samples the target from the image's condition
and the prompt with guidance, and the samples are written in the task's layout (schema.INPAINT /
EDIT) with the condition columns. An inpainting line without a mask gets random_mask(seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ladd_ds.config import Config, config_to_dict
from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.images import UNREADABLE, image_bucket, load_cropped, load_mask
from ladd_ds.data.prompts import PromptJob, input_digest, load_prompt_jobs, numbered_lines, parse_bucket
from ladd_ds.data.schema import TASK_LAYOUTS
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.distributed.zero_sizes import resolve_zero3_sizes
from ladd_ds.generate.dataset import (
    Generation,
    common_settings,
    generate_dataset,
    generation_buckets,
    model_identity,
    prepare_output,
    start_generation,
)
from ladd_ds.generate.masks import DEFAULT_KINDS, check_kinds, random_mask
from ladd_ds.models.codec import codec_factor, load_codec
from ladd_ds.models.conditioning import batch_condition, latent_channels
from ladd_ds.models.flow_model import build_flow_model
from ladd_ds.models.registry import check_teacher_task
from ladd_ds.sampling import TeacherSampler, condition_columns, load_text_encoder


def build_teacher(cfg: Config, task: str = "t2i"):
    """The teacher for sampling: replicated on every rank, or partitioned with ZeRO-3
    (synth.zero_stage = 3) for teachers too large for one device; a transformer of `task`."""

    if cfg.synth.zero_stage == 3:
        ds_config = ds.fill_ds_config(
            ds.load_template(cfg.deepspeed.teacher_config, "deepspeed.teacher_config"),
            micro_batch_size=cfg.synth.batch_size,
            grad_accum=1,
            world_size=world_size(),
            precision=cfg.deepspeed.precision,
        )

        meta = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, device="meta", task=task)
        ds_config = resolve_zero3_sizes(ds_config, meta)  # "auto" gather sizes: about two of its blocks
        teacher = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, ds_config=ds_config, task=task).transformer
        teacher.requires_grad_(False)
        return ds.frozen_engine(teacher, ds_config).module
    dtype = dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")
    teacher = build_flow_model(cfg.model.teacher, seed=cfg.run.seed, device=ds.device(), dtype=dtype, task=task).transformer
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


# The synth settings that shape a sample (batch and part sizes, zero_stage and paths do not).
SAMPLE_SETTINGS = ("buckets", "bucket_weights", "guidance_scale", "num_steps", "shift", "seed")


def run_synth(
    cfg: Config, *, prompts: str, out: str | Path, task: str = "t2i", mask_kinds: tuple[str, ...] | None = None
) -> dict | None:
    out = Path(out)
    s = cfg.synth
    factor = codec_factor(cfg.codec.vae)
    model_cfg, buckets = generation_buckets(cfg)
    kinds = check_kinds(mask_kinds or DEFAULT_KINDS)
    if task == "t2i":
        jobs = load_prompt_jobs(prompts, buckets, s.bucket_weights, s.seed)
    else:
        check_teacher_task(cfg.model.teacher, task, needed_by=f"`ladd-ds synth --task {task}`")
        jobs = load_condition_jobs(prompts, buckets, s.seed, task, mine=lambda i: i % world_size() == rank())
    device = start_generation(cfg, out)
    identity = model_identity(cfg.model.teacher, cfg.run.seed)
    sample_settings = {k: v for k, v in config_to_dict(cfg)["synth"].items() if k in SAMPLE_SETTINGS}
    settings = {"teacher": cfg.model.teacher, "teacher_identity": identity, "synth": sample_settings, **common_settings(cfg)}
    if task != "t2i":  # recorded only for the new tasks: t2i outputs of earlier versions still resume
        settings.update(task=task, **({"mask_kinds": list(kinds)} if task == "inpaint" else {}))
    finished = prepare_output(out, jobs, "synth", settings)
    if finished is not None:
        return finished
    text = load_text_encoder(cfg, device)
    teacher = build_teacher(cfg, task)
    sampler = TeacherSampler(teacher, text, s.shift, factor)

    def make_rows(batch: list[PromptJob], conditioning):
        h, w = parse_bucket(batch[0].bucket)
        prompts, seeds = [j.prompt for j in batch], [j.seed for j in batch]
        latents = sampler.sample(
            prompts,
            seeds,
            height=h,
            width=w,
            device=device,
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            conditioning=conditioning,
        )
        return {"latent": latents, "seed": seeds}, batch, []

    if task != "t2i":
        make_rows = conditioned_rows(cfg, task, kinds, sampler, latent_channels(model_cfg), device)
    source = {"kind": "teacher samples", "model": cfg.model.teacher, "seed": cfg.run.seed, "fingerprint": identity}
    source["lockstep"] = s.zero_stage == 3
    if task != "t2i":
        source["task"] = task
    gen = Generation(name="synth", section="synth", batch_size=s.batch_size, part_size=s.part_size, layout=TASK_LAYOUTS[task])
    return generate_dataset(cfg, jobs=jobs, out=out, make_rows=make_rows, source=source, text=text, gen=gen)


def load_condition_jobs(path: str | Path, buckets: list[str], seed: int, task: str, mine=lambda index: True) -> list[PromptJob]:
    """One job per JSONL line {"prompt", "image"[, "mask"][, "seed"]} (paths relative to the
    file's folder), keyed by its position; the bucket (read for this rank's lines only) is the
    one nearest the image's shape. `image`: the image, `other_image`: the inpainting mask or None."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise InputError(f'{path}: `synth --task {task}` reads a .jsonl file of {{"prompt", "image"}} lines')
    jobs = []
    for index, (n, line) in enumerate(numbered_lines(path, what="prompt file", expected="JSONL lines with 'prompt' and 'image'")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not isinstance(record.get("image"), str):
            raise InputError(
                f"{path}:{n}: expected an object with a string 'prompt' and 'image' (a path relative to {path.parent})"
            )
        if "mask" in record and task != "inpaint":
            raise InputError(f"{path}:{n}: 'mask' is for --task inpaint, not {task}")
        files = [path.parent / record["image"]] + ([path.parent / record["mask"]] if record.get("mask") else [])
        for file in files:
            if not file.is_file():
                raise MissingInputError(f"{path}:{n}: {file} not found (paths are relative to {path.parent})")
        sample_seed = record.get("seed", seed * 1_000_003 + index)
        if not isinstance(sample_seed, int):
            raise InputError(f"{path}:{n}: 'seed' must be an integer")
        bucket = image_bucket(files[0], buckets) if mine(index) else ""
        digest = input_digest(
            record["prompt"], sample_seed, [record["image"], record.get("mask")], [f.stat().st_size for f in files]
        )
        mask = str(files[1]) if len(files) > 1 else None
        jobs.append(
            PromptJob(
                index, record["prompt"], bucket, sample_seed, image=str(files[0]), key=str(index), digest=digest, other_image=mask
            )
        )
    return jobs


def conditioned_rows(cfg: Config, task: str, kinds, sampler: TeacherSampler, channels: int, device):
    """synth's make_rows for an inpainting or editing teacher: each job's condition from its
    image (and mask, or a random one from its seed), then the teacher's guided sample."""

    s = cfg.synth
    codec = load_codec(cfg.codec.vae, channels, seed=cfg.codec.seed).to(device)
    lockstep = s.zero_stage == 3

    def keep_in_step():
        """A ZeRO-3 teacher: every rank runs the same forwards (each gathers the weights), so a
        rank with nothing to sample in this round samples a blank condition and drops it."""
        if lockstep:
            h, w = s.buckets[0]
            extra = sampler.transformer.config.in_channels - channels
            blank = torch.zeros(1, extra, h // codec.factor, w // codec.factor)
            sampler.sample(
                [""],
                [0],
                height=h,
                width=w,
                device=device,
                num_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                condition=blank,
            )

    def make_rows(batch: list[PromptJob], conditioning):
        if batch[0].bucket in (UNREADABLE, ""):  # "": another rank's job (a lockstep round)
            keep_in_step()
            return {}, [], [(j, "cannot identify the image file (not a decodable image)") for j in batch if j.bucket]
        h, w = parse_bucket(batch[0].bucket)
        made, pixels, masks, skipped = [], [], [], []
        for job in batch:
            try:
                pixels.append(load_cropped(job.image, h, w))
                if task == "inpaint":
                    masks.append(
                        load_mask(job.other_image, h, w) if job.other_image else random_mask(h, w, seed=job.seed, kinds=kinds)
                    )
                made.append(job)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                pixels, masks = pixels[: len(made)], masks[: len(made)]
                skipped.append((job, f"does not decode: {e}"))
        if not made:
            keep_in_step()
            return {}, [], skipped
        with torch.no_grad():
            columns = condition_columns(
                codec, task, torch.stack(pixels).to(device), torch.stack(masks).to(device) if masks else None
            )  # each (B', ., h, w)
        if conditioning is not None and len(made) < len(batch):
            kept = {j.key for j in made}
            rows = [i for i, j in enumerate(batch) if j.key in kept]
            conditioning = tuple(x[rows] for x in conditioning)
        prompts, seeds = [j.prompt for j in made], [j.seed for j in made]
        condition = batch_condition(columns, task)  # (B', extra, h, w)
        latents = sampler.sample(
            prompts,
            seeds,
            height=h,
            width=w,
            device=device,
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            conditioning=conditioning,
            condition=condition,
        )
        return {"latent": latents, **columns, "seed": seeds}, made, skipped

    return make_rows
