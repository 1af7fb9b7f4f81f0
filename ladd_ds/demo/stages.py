"""The demo's stages that its pipelines share (the text-to-image one, ladd_ds.demo.pipeline, and
the inpainting/editing one, ladd_ds.demo.task_pipeline): the command arguments of the demo's
config, the training data (`make_data`), a LADD run and its export (`ladd_stage`), and the
teacher as a sampling model. Commands run through the `Runner` each stage is given; each stage
is skipped when its output is already complete, so an interrupted demo continues."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ladd_ds.core.errors import InputError
from ladd_ds.demo import digits
from ladd_ds.demo.presets import DEMO_CONFIG, OPEN_PLACE, DemoSize, teacher_sampler
from ladd_ds.demo.runner import Runner


def set_args(sets: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for s in sets for arg in ("--set", s)]


def model_args(teacher: Path, precision: str) -> list[str]:
    """A command's --config/--set arguments: configs/demo.yaml with `teacher` as the model and
    its text encoders, at `precision`."""
    sets = [f"model.teacher={teacher}", f"text.encoders={teacher}", f"deepspeed.precision={precision}"]
    return ["--config", str(DEMO_CONFIG), *set_args(sets)]


def sampler_args(size: DemoSize) -> list[str]:
    """The --set arguments of a synth or pairs command for the size's teacher sampler steps
    (none where the size keeps configs/demo.yaml's)."""
    if size.synth_steps is None:
        return []
    return set_args([f"synth.num_steps={size.synth_steps}", f"pairs.steps={size.synth_steps}"])


def export(run_dir: Path, out: Path, **options) -> Path:
    """`ladd-ds export --run RUN_DIR --out OUT [options]`, in this process: unlike the training and
    generating stages it starts no distributed job and leaves no state behind (it reads the
    checkpoint and writes a folder), so a subprocess would only add its start-up."""
    from ladd_ds.export import export_run

    options.setdefault("dtype", "fp32")  # the demo evaluates and distils in fp32 on CPU
    flags = "".join(f" --{k} {v}" if v is not True else f" --{k}" for k, v in options.items())
    print(f"$ ladd-ds export --run {run_dir} --out {out}{flags}", flush=True)
    return export_run(run_dir, out, **options)


def write_prompt_file(path: Path, *, n: int, seed: int) -> Path:
    """JSONL prompts with a bucket each (half per bucket) and labels drawn uniformly from the
    combinations that are not held out (digits.HELD_OUT_COMBINATIONS)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, w = digits.BUCKETS[i % len(digits.BUCKETS)]
        label = digits.random_label(rng, combinations="seen", open_place=OPEN_PLACE)
        lines.append(json.dumps({"prompt": label.prompt, "bucket": f"{h}x{w}"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_real_images(folder: Path, *, n: int, seed: int) -> tuple[Path, Path]:
    """Rendered training-split images and captions, for `ladd-ds encode` (the real-data ablation)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    per_bucket = [
        digits.make_samples(
            n // len(digits.BUCKETS), "train", seed=seed + k, bucket=b, combinations="seen", open_place=OPEN_PLACE
        )
        for k, b in enumerate(digits.BUCKETS)
    ]
    for i, (image, label, _) in enumerate(s for samples in per_bucket for s in samples):  # as many per bucket as synth
        name = f"{i:06d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / name)
        captions.append(json.dumps({"file": name, "caption": label.prompt}))
    caption_file = folder.with_suffix(".jsonl")
    caption_file.write_text("\n".join(captions) + "\n")
    return folder, caption_file


def make_data(
    data: Path, teacher: Path, size: DemoSize, kind: str, *, runner: Runner, prompts: int | None = None, seed: int = 11
) -> Path:
    """The LADD training shards: teacher samples (`ladd-ds synth`) of `prompts` prompts (default:
    the size's synth_prompts) drawn with `seed`, or, for the real-data ablation, rendered training
    images (`ladd-ds encode`). Skipped when already complete."""
    if (data / "manifest.json").is_file():
        return data
    data.parent.mkdir(parents=True, exist_ok=True)
    common = model_args(teacher, size.precision)
    if kind == "real":
        images, captions = write_real_images(data.with_name(data.name + "_images"), n=size.synth_prompts, seed=7)
        runner(
            ["encode", *common, "--images", str(images), "--captions", str(captions), "--out", str(data)],
            data.with_suffix(".log"),
        )
    else:
        n = size.synth_prompts if prompts is None else prompts
        prompt_file = write_prompt_file(data.with_name(data.name + "_prompts.jsonl"), n=n, seed=seed)
        args = ["synth", *common, *sampler_args(size), "--prompts", str(prompt_file), "--out", str(data)]
        runner(args, data.with_suffix(".log"))
    return data


def make_held_out(data: Path, teacher: Path, size: DemoSize, *, runner: Runner) -> Path:
    """The validation set of the main LADD runs: the teacher's samples (`ladd-ds synth`) of
    size.val_prompts prompts drawn with another seed than the training data's. The label space is
    small, so some prompt texts also occur in the training data; their samples are other draws."""
    return make_data(data, teacher, size, "synthetic", runner=runner, prompts=size.val_prompts, seed=13)


def validation_sets(held_out: Path, size: DemoSize) -> list[str]:
    """The --set overrides of a LADD run validated on `held_out` every size.val_every steps."""
    return [f"eval.data={held_out}", f"eval.every={size.val_every}", f"eval.num_samples={size.val_prompts}"]


def ladd_stage(
    work: Path,
    *,
    data: Path,
    teacher: Path,
    size: DemoSize,
    runner: Runner,
    max_steps: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> Path:
    """LADD training on `data` for `max_steps` (default: the size's train_steps) with the further
    `--set` overrides `sets`, then export; skipped when the export exists and was trained as
    many steps as this stage asks (another count is an error: the stage would be stale). Returns
    the export."""
    max_steps = size.train_steps if max_steps is None else max_steps
    run_dir, student = work / "run", work / "student"
    if (student / "ladd_export.json").is_file():
        trained = json.loads((student / "ladd_export.json").read_text()).get("step")
        if trained != max_steps:
            raise InputError(
                f"{student} holds a student trained {trained} LADD steps, this demo's stage trains {max_steps}: "
                f"use another --out, or delete {work} to train it again"
            )
        return student
    overrides = [f"data.path={data}", f"run.run_dir={run_dir}", f"run.max_steps={max_steps}"]
    overrides += [f"logging.sample_every={size.sample_every}", *sets]
    work.mkdir(parents=True, exist_ok=True)
    runner(["train", *model_args(teacher, size.precision), *set_args(overrides)], work / "train.log")
    export(run_dir, student)
    return student


def load_teacher(folder: Path, size: DemoSize):
    """The teacher (or a DPO'd teacher) as a sampling model with the demo's sampler shift."""
    from ladd_ds.sampling import load_sampling_model

    tm = load_sampling_model(folder, precision=size.precision)
    tm.shift = teacher_sampler()[0]
    return tm
