"""`ladd-ds demo --tasks inpaint,edit`: LADD for inpainting and editing on the colored digits.

Per task (stages skipped when their output is complete, like the text-to-image demo's):
  1. teacher   `ladd-ds pretrain-teacher --task T`: the task's teacher, started from the cached
               text-to-image teacher (widened), cached under --cache
  2. synth     `ladd-ds synth --task T`: the task teacher generates the targets from conditions
               of training-split digits (PNG files and a JSONL written here) and their prompts
  3. train     `ladd-ds train` with ladd.task = T (configs/demo.yaml), then export
               (ladd_ds.demo.stages.ladd_stage, as the text-to-image demo's)
  4. evaluate  teacher at 50 and 4 steps (CFG), student at 1 and 4 steps, on held-out digits,
               several noise seeds each: FD, the task's measures, NFE and ms/image
The rows and the task's goal go into report.md (ladd_ds.demo.report.task_tables). Commands run
through the `Runner` that ladd_ds.demo.pipeline.run_demo is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ladd_ds.core.errors import InputError
from ladd_ds.core.timing import timed
from ladd_ds.demo import digits, tasks
from ladd_ds.demo.presets import DemoSize, teacher_sampler, teacher_settings
from ladd_ds.demo.pretrain import cached_teacher, task_settings
from ladd_ds.demo.runner import Runner
from ladd_ds.demo.stages import ladd_stage, load_teacher, model_args, sampler_args

TEACHER_STEPS = (50, 4)  # the teacher rows (the first is the reference)
STUDENT_STEPS = (1, 4)
# The goals (docs/demo.md, "Inpainting and editing in the demo"): inpainting student at 1 step
# within this FD ratio of the teacher at 50 steps; editing student at 4 steps with this share of
# the teacher's edit success and at least this preservation.
INPAINT_MAX_FD_RATIO = 1.25
EDIT_MIN_SUCCESS_SHARE, EDIT_MIN_PRESERVATION = 0.9, 0.95
# Measures of each task besides FD: (result key, column title, better).
MEASURES = {
    "inpaint": [("kept_error", "kept-region error", "↓"), ("alignment", "filled-region alignment", "↑")],
    "edit": [("success", "edit success", "↑"), ("preservation", "preservation", "↑")],
}
# Sample grids in TensorBoard: prompts that fit the task (the inpaint ones are the t2i demo's).
EDIT_PREVIEW_PROMPTS = ["make it green", "move it to the bottom left", "make it a seven", "make it red"]
SYNTH_SEED, EVAL_SEED = 17, 2026


def _save_png(path: Path, image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> PNG (RGB or, for one channel, grey); returns the file name."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path.name


def write_condition_file(folder: Path, task: str, *, n: int, seed: int) -> Path:
    """`ladd-ds synth --task` input from training-split digits: PNG images (and masks, white =
    fill in) in `folder` and `folder`.jsonl with a line {"prompt", "image"[, "mask"]} each, half
    per bucket. Written once (kept when complete)."""
    jsonl = folder.with_suffix(".jsonl")
    if jsonl.is_file():
        return jsonl
    folder.mkdir(parents=True, exist_ok=True)
    make = tasks.TASK_BATCHES[task][0]
    source = digits.load_source_digits("train")
    lines = []
    for k, bucket in enumerate(digits.BUCKETS):
        for i, ex in enumerate(make(n // len(digits.BUCKETS), "train", seed=seed + k, bucket=bucket, source=source)):
            stem = folder / f"{k}_{i:05d}"
            if task == "inpaint":
                image = _save_png(stem.with_suffix(".png"), (ex.image + 1) / 2)
                mask = _save_png(stem.with_name(stem.name + "_mask.png"), ex.mask)
                lines.append({"prompt": ex.prompt, "image": f"{folder.name}/{image}", "mask": f"{folder.name}/{mask}"})
            else:
                image = _save_png(stem.with_suffix(".png"), (ex.source + 1) / 2)
                lines.append({"prompt": ex.instruction, "image": f"{folder.name}/{image}"})
    tmp = jsonl.with_name(f".{jsonl.name}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(jsonl)
    return jsonl


@dataclass
class TaskRow:
    """One configuration of a task table, over several noise seeds."""

    name: str
    kind: str  # "teacher" or "student"
    steps: int
    cfg: float
    nfe: int
    num_images: int
    fd: list[float] = field(default_factory=list)  # one per seed
    measures: list[dict[str, float]] = field(default_factory=list)
    ms_per_image: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def stats(values):
            return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

        out = {"name": self.name, "kind": self.kind, "steps": self.steps, "cfg": self.cfg, "nfe": self.nfe}
        out |= {"num_images": self.num_images, "seeds": len(self.fd)}
        out["fd"], out["fd_std"] = stats(self.fd)
        out["ms_per_image"], out["ms_per_image_std"] = stats(self.ms_per_image)
        for key in self.measures[0]:
            out[key], out[f"{key}_std"] = stats([m[key] for m in self.measures])
        return out


class TaskEvaluator:
    """Held-out examples of a task (half per bucket) and the measures of a model's results on them:
    FD against held-out real images (inpainting: of the results pasted back into the kept area),
    and tasks.inpaint_metrics / tasks.edit_metrics."""

    def __init__(self, task: str, classifier, *, n: int, num_real: int, frechet: Callable[[list[torch.Tensor]], float]):
        self.task, self.classifier, self.frechet = task, classifier.eval(), frechet
        make = tasks.TASK_BATCHES[task][0]
        source = digits.load_source_digits("heldout")
        self.examples = {
            bucket: make(n // len(digits.BUCKETS), "heldout", seed=EVAL_SEED + k, bucket=bucket, source=source)
            for k, bucket in enumerate(digits.BUCKETS)
        }
        self.num_images = sum(len(v) for v in self.examples.values())

    def _inputs(self, examples) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        if self.task == "inpaint":
            return torch.stack([e.image for e in examples]), torch.stack([e.mask for e in examples]), [e.prompt for e in examples]
        return torch.stack([e.source for e in examples]), None, [e.instruction for e in examples]

    def _measure(self, examples, out: torch.Tensor, images: torch.Tensor, masks) -> tuple[dict, torch.Tensor]:
        """The task's measures of outputs (B, 3, H, W) in [-1, 1] for one bucket's examples, and the
        images that FD compares (inpainting: pasted back, what a user gets), in [0, 1]."""
        if self.task == "inpaint":
            measures = tasks.inpaint_metrics(self.classifier, out, images, masks, [e.label for e in examples])
            out = masks * out + (1 - masks) * images
        else:
            labels = [e.source_label for e in examples], [e.target_label for e in examples]
            measures = tasks.edit_metrics(self.classifier, out, images, *labels, [e.kind for e in examples])
        return measures, ((out + 1.0) / 2.0).clamp(0, 1)

    def _average(self, measures: list[dict]) -> dict[str, float]:
        """The buckets' measures, weighted by their examples; per edit kind ("success/place"),
        weighted by the examples of that kind."""
        weights = [len(v) for v in self.examples.values()]
        out = {key: float(np.average([m[key] for m in measures], weights=weights)) for key, _, _ in MEASURES[self.task]}
        for key in sorted({k for m in measures for k in m if "/" in k}):
            kind = key.split("/")[1]
            pairs = [(m[key], sum(e.kind == kind for e in ex)) for m, ex in zip(measures, self.examples.values()) if key in m]
            out[key] = float(np.average([v for v, _ in pairs], weights=[n for _, n in pairs]))
        return out

    @torch.no_grad()
    def reference(self) -> dict:
        """The real answers scored like a model's results (edit: the rendered targets; inpaint: the
        source images): the ceiling the classifier and the FD's sample size allow."""
        measures, results = [], []
        for examples in self.examples.values():
            images, masks, _ = self._inputs(examples)
            real = torch.stack([e.target for e in examples]) if self.task == "edit" else images
            m, shown = self._measure(examples, real, images, masks)
            measures.append(m)
            results.append(shown)
        return {"name": "real", "kind": "real", "num_images": self.num_images, "fd": self.frechet(results)} | self._average(
            measures
        )

    @torch.no_grad()
    def evaluate(self, name: str, sm, steps: int, cfg: float, seeds: list[int]) -> TaskRow:
        from ladd_ds.core.noise import derive_seed
        from ladd_ds.sampling import generate, network_evaluations, task_condition

        row = TaskRow(name, sm.kind, steps, cfg, network_evaluations(sm.kind, steps, cfg), self.num_images)
        conditions = {}
        for bucket, examples in self.examples.items():
            images, masks, prompts = self._inputs(examples)
            conditions[bucket] = (images, masks, prompts, task_condition(sm, self.task, images, masks))
        for seed in seeds:
            results, measures, seconds = [], [], 0.0
            for k, (bucket, examples) in enumerate(self.examples.items()):
                images, masks, prompts, condition = conditions[bucket]
                noise_seeds = [derive_seed(seed, k, i) for i in range(len(prompts))]
                out, took = generate(
                    sm, prompts, noise_seeds, height=bucket[0], width=bucket[1], steps=steps, cfg=cfg, condition=condition
                )
                seconds += took
                m, shown = self._measure(examples, out * 2.0 - 1.0, images, masks)  # [0, 1] -> the examples' [-1, 1]
                measures.append(m)
                results.append(shown)
            row.measures.append(self._average(measures))
            row.fd.append(self.frechet(results))
            row.ms_per_image.append(1000.0 * seconds / self.num_images)
        return row


def goal(task: str, rows: list[dict]) -> dict:
    """The task's goal from its rows: {"text", "met"}."""
    teacher = {r["steps"]: r for r in rows if r["kind"] == "teacher"}
    student = {r["steps"]: r for r in rows if r["kind"] == "student"}
    top = max(teacher)
    ref = teacher[top]
    if task == "inpaint":
        ratio = student[1]["fd"] / max(ref["fd"], 1e-9)
        met = ratio <= INPAINT_MAX_FD_RATIO
        text = (
            f"Inpainting: student 1 step FD {student[1]['fd']:.2f} vs teacher {top} steps {ref['fd']:.2f}: "
            f"ratio {ratio:.2f} (goal ≤ {INPAINT_MAX_FD_RATIO})"
        )
    else:
        share = student[4]["success"] / max(ref["success"], 1e-9)
        kept = student[4]["preservation"]
        met = share >= EDIT_MIN_SUCCESS_SHARE and kept >= EDIT_MIN_PRESERVATION
        text = (
            f"Editing: student 4 steps edit success {student[4]['success']:.3f} = {100 * share:.0f}% of the teacher's "
            f"{ref['success']:.3f} at {top} steps (goal ≥ {100 * EDIT_MIN_SUCCESS_SHARE:.0f}%), preservation "
            f"{kept:.3f} (goal ≥ {EDIT_MIN_PRESERVATION})"
        )
    return {"text": text, "met": bool(met)}


def check_stage_teacher(data: Path, teacher: Path) -> None:
    """Completed stages are reused; data of another teacher (e.g. one pretrained with other
    settings since) must not be."""
    manifest = data / "manifest.json"
    if manifest.is_file():
        made_by = json.loads(manifest.read_text()).get("source", {}).get("model")
        if made_by != str(teacher):
            raise InputError(
                f"{data} was generated by the teacher {made_by}, this demo's teacher is {teacher}: "
                f"use another --out, or delete {data.parent} to run its stages again"
            )


def run_task(out: Path, task: str, cache: Path, size: DemoSize, classifier, frechet: Callable, *, runner: Runner) -> dict:
    """The task's stages under out/TASK; returns its results (rows, goal, timings). `frechet`: FD
    of generated image batches (lists of (N, 3, H, W) in [0, 1]) against held-out real images;
    `runner` runs the commands."""
    work = out / task
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with timed(timings, "teacher pretraining") as timing:
        settings = task_settings(task, teacher_settings(size), steps=size.task_pretrain_steps)
        teacher, was_cached = cached_teacher(cache, settings)
        if was_cached:
            timing.key = "teacher (cached)"

    with timed(timings, "synth"):
        data = work / "data"
        check_stage_teacher(data, teacher)
        if not (data / "manifest.json").is_file():
            conditions = write_condition_file(work / "conditions", task, n=size.synth_prompts, seed=SYNTH_SEED)
            args = ["synth", "--task", task, *model_args(teacher, size.precision), *sampler_args(size)]
            args += ["--prompts", str(conditions)]
            runner([*args, "--out", str(data)], work / "synth.log")

    with timed(timings, "LADD train + export"):
        sets = [f"ladd.task={task}"]
        if task == "edit":
            sets.append("logging.sample_prompts=[" + ", ".join(EDIT_PREVIEW_PROMPTS) + "]")
        max_steps = size.task_train_steps.get(task, size.train_steps)
        student = ladd_stage(work, data=data, teacher=teacher, size=size, runner=runner, max_steps=max_steps, sets=sets)

    with timed(timings, "evaluation"):
        from ladd_ds.sampling import load_sampling_model

        evaluator = TaskEvaluator(task, classifier, n=size.eval_prompts, num_real=size.num_real, frechet=frechet)
        tm, cfg = load_teacher(teacher, size), teacher_sampler()[1]
        rows = []
        for steps in TEACHER_STEPS:
            steps = min(steps, max(size.teacher_steps))  # the test size samples fewer steps
            print(f"evaluate {task}: teacher {steps} steps, CFG {cfg:g}", flush=True)
            rows.append(evaluator.evaluate(f"teacher {steps} steps", tm, steps, cfg, size.seeds).summary())
        sm = load_sampling_model(student, precision=size.precision)
        for steps in STUDENT_STEPS:
            print(f"evaluate {task}: LADD student {steps} steps", flush=True)
            rows.append(evaluator.evaluate(f"LADD student {steps} steps", sm, steps, 1.0, size.seeds).summary())
        reference = evaluator.reference()
    return {
        "teacher": str(teacher),
        "teacher_info": json.loads((teacher / "ladd_model.json").read_text()).get("settings", {}),
        "rows": rows,
        "reference": reference,  # the real answers, scored the same way
        "goal": goal(task, rows),
        "measures": MEASURES[task],  # the table's columns besides FD: (key, title, arrow)
        "num_images": evaluator.num_images,
        "timings_s": timings,
        "tensorboard": str((work / "run" / "tb").relative_to(out)),
    }
