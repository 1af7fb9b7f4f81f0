"""The text-to-image demo's evaluation: the table rows of the teacher and the students
(`evaluate_models`), the teacher under other sampler settings, the discriminator's separation
read from the LADD run's metrics, and the sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ladd_ds.demo import digits
from ladd_ds.demo.presets import OPEN_PLACE, DemoSize, teacher_sampler
from ladd_ds.demo.stages import load_teacher


def evaluate_models(
    teacher: Path,
    students: list[Path],
    size: DemoSize,
    evaluator,
    teacher_steps: list[int] | None = None,
    seeds: list[int] | None = None,
) -> list[dict]:
    """Rows for the teacher at `teacher_steps` (default: all of the size's; [] for none) and the
    students at the size's student steps, each over `seeds` (default: the size's). Students of
    several training runs share one row per step count, pooled over runs and seeds; the row's
    `per_run` lists each run's own means."""
    from ladd_ds.demo.evaluate import RowResult
    from ladd_ds.sampling import load_sampling_model

    seeds = size.seeds if seeds is None else seeds
    teacher_steps = size.teacher_steps if teacher_steps is None else teacher_steps
    rows = []
    if teacher_steps:
        tm, cfg = load_teacher(teacher, size), teacher_sampler()[1]
        for steps in sorted(teacher_steps, reverse=True):
            print(f"evaluate: teacher {steps} steps, shift {tm.shift:g}, CFG {cfg:g}", flush=True)
            rows.append(evaluator.evaluate(f"teacher {steps} steps", tm, steps, cfg, seeds).summary())
    per_steps: dict[int, list] = {steps: [] for steps in size.student_steps}
    for k, student in enumerate(students):
        sm = load_sampling_model(student, precision=size.precision)
        for steps in size.student_steps:
            print(f"evaluate: LADD student {steps} steps (training run {k + 1} of {len(students)})", flush=True)
            per_steps[steps].append(evaluator.evaluate(f"LADD student {steps} steps", sm, steps, 1.0, seeds))
    for steps, runs in per_steps.items():
        row = RowResult.pooled(runs).summary()
        if len(runs) > 1:
            row["per_run"] = [{"fd": r.summary()["fd"], "alignment": r.summary()["alignment"]} for r in runs]
        rows.append(row)
    return rows


def teacher_sampler_sweep(teacher: Path, size: DemoSize, evaluator) -> list[dict]:
    """The teacher at 4 steps and at its top step count under each (shift, CFG) of
    `size.sampler_sweep` (one seed): rows with a `shift` key."""
    from ladd_ds.sampling import load_sampling_model

    tm = load_sampling_model(teacher, precision=size.precision)
    rows = []
    for shift, cfg in size.sampler_sweep:
        tm.shift = shift
        for steps in (max(size.teacher_steps), 4):
            print(f"evaluate: teacher {steps} steps, shift {shift:g}, CFG {cfg:g}", flush=True)
            rows.append(
                {**evaluator.evaluate(f"teacher {steps} steps", tm, steps, cfg, size.seeds[:1]).summary(), "shift": shift}
            )
    return rows


def discriminator_separation(run_dir: Path, after_step: int) -> dict:
    """From the LADD run's metrics.jsonl: the mean of d/real_logit - d/fake_logit over the logged
    steps after `after_step` (the warm-up), its standard error over those steps, and the mean of
    each logit. Clearly positive (several standard errors): the heads tell the teacher's samples
    from the student's."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in records if "d/real_logit" in r and isinstance(r["d/real_logit"], float)]
    late = [r for r in logged if r["step"] > after_step] or logged
    if not late:
        return {"steps": 0}
    real = np.array([r["d/real_logit"] for r in late])
    fake = np.array([r["d/fake_logit"] for r in late])
    gap = real - fake
    stderr = float(gap.std(ddof=1) / np.sqrt(len(gap))) if len(gap) > 1 else float("inf")
    return {
        "steps": len(late),
        "after_step": after_step,
        "real_logit": float(real.mean()),
        "fake_logit": float(fake.mean()),
        "separation": float(gap.mean()),
        "separation_stderr": stderr,
    }


def training_curves(run_dir: Path) -> list[dict]:
    """From the LADD run's metrics.jsonl, one row per validation (eval.every): the step, the
    validation FDs in the teacher's token space ("fd_tokens": {"N" steps: FD}), and the means of
    the losses and of the discriminator's logit gap (d/real_logit - d/fake_logit) over the steps
    logged since the previous validation. [] for a run without validation."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows, since = [], []
    for r in records:
        if "val/seconds" not in r:
            if isinstance(r.get("d/real_logit"), float):  # a skipped step logs them as NaN strings
                since.append(r)
            continue
        fds = {
            int(k.split("/")[2].removesuffix("step")): v
            for k, v in r.items()
            if k.startswith("val/fd_tokens/") and k.count("/") == 2
        }
        row = {"step": r["step"], "fd_tokens": {str(n): fds[n] for n in sorted(fds)}, "val_seconds": r["val/seconds"]}
        for key, name in (("loss/generator", "loss_g"), ("loss/discriminator", "loss_d")):
            row[name] = float(np.mean([x[key] for x in since])) if since else float("nan")
        row["logit_gap"] = float(np.mean([x["d/real_logit"] - x["d/fake_logit"] for x in since])) if since else float("nan")
        rows.append(row)
        since = []
    return rows


def write_grids(out: Path, *, teacher: Path, student: Path, size: DemoSize) -> list[Path]:
    """One PNG per configuration: a row per prompt, one column per seed."""
    from ladd_ds.core.noise import derive_seed
    from ladd_ds.sampling import generate, load_sampling_model, save_samples

    prompts = [digits.random_label(np.random.default_rng(99 + i), open_place=OPEN_PLACE).prompt for i in range(size.grid_prompts)]
    index = [i for i in range(len(prompts)) for _ in range(size.grid_columns)]
    seeds = [derive_seed("grid", i, j) for i in range(len(prompts)) for j in range(size.grid_columns)]
    tm, sm, cfg = load_teacher(teacher, size), load_sampling_model(student, precision=size.precision), teacher_sampler()[1]
    configs = [(tm, max(size.teacher_steps), cfg), (tm, 4, cfg)]
    configs += [(sm, s, 1.0) for s in size.student_steps]
    written = []
    for model, steps, cfg in configs:
        height, width = digits.BUCKETS[0]
        images, _ = generate(model, [prompts[i] for i in index], seeds, height=height, width=width, steps=steps, cfg=cfg)
        name = f"{model.kind}_{steps}steps"
        written.append(save_samples(out / "grids" / name, images, index, seeds, prompts, rows=len(prompts))[0])
    return written
