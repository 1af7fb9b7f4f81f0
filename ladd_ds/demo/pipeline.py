"""`ladd-ds demo --out DIR`: the whole LADD pipeline on the colored-digits task, on a CPU.

Stages (each skipped when its output is already complete, so an interrupted demo continues):
  1. teacher     `ladd-ds pretrain-teacher` result, cached under --cache (keyed by its settings)
  2. classifier  the evaluation's digit/color/place classifier, cached likewise
  3. synth       `ladd-ds synth`: the teacher generates the LADD training latents (CFG), and a
                 held-out set of other prompts for validation during training
  4. train       `ladd-ds train --config configs/demo.yaml`: LADD (TensorBoard in the run dir),
                 validated every DemoSize.val_every steps (eval.every; the report's training curves)
  5. export      `ladd-ds export`: the student as a diffusers folder
  6. evaluate    teacher at 1..50 steps and student at 1, 2, 4 steps, 3 seeds each
  7. report      DIR/report.md, DIR/fd_vs_steps.png, DIR/grids/*.png, DIR/eval.json
Stages 3-4 run the real command-line tools through the `Runner` given to `run_demo`
(ladd_ds.demo.runner: by default as subprocesses, exactly as a user would); the export (stage 5)
runs in this process through the function the `ladd-ds export` command calls. This module is the
flow; the stages it shares with the inpainting/editing demo (ladd_ds.demo.task_pipeline) are in
ladd_ds.demo.stages, the sizes and the ablation table in ladd_ds.demo.presets, the evaluation's
rows in ladd_ds.demo.t2i_eval.
With --ablations, stages 3-6 are repeated for each ablation setting (a second table);
`--ablations real_data,re_noise_m_0` runs only the named ones (`presets.ablation_slugs()`).
With --dpo, the paper's DPO recipe follows (ladd_ds.demo.dpo_recipe): `ladd-ds pairs` ranks K teacher
samples per prompt by the classifier's confidence in the asked-for digit, `ladd-ds dpo` trains a
LoRA on the teacher, `ladd-ds export --merge` gives the DPO'd teacher, LADD distills it, and
`ladd-ds export --lora` applies the same LoRA to that student (a third table).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ladd_ds.core.errors import InputError
from ladd_ds.core.outputs import OUTPUT_MARKER, check_output, write_marker
from ladd_ds.core.timing import timed
from ladd_ds.demo import digits
from ladd_ds.demo.dpo_recipe import dpo_recipe
from ladd_ds.demo.presets import (
    DEFAULT_TASKS,
    DEMO_CONFIG,
    DEMO_TASKS,
    OPEN_PLACE,
    SIZES,
    DemoSize,
    select_ablations,
    slug,
    teacher_sampler,
    teacher_settings,
)
from ladd_ds.demo.pretrain import cached_teacher
from ladd_ds.demo.runner import Runner
from ladd_ds.demo.stages import ladd_stage, make_data, make_held_out, validation_sets
from ladd_ds.demo.t2i_eval import (
    discriminator_separation,
    evaluate_models,
    teacher_sampler_sweep,
    training_curves,
    write_grids,
)


def t2i_demo(
    out: Path,
    *,
    cache: Path,
    s: DemoSize,
    teacher: Path,
    classifier,
    ablations,
    dpo: bool,
    sampler_sweep: bool,
    timings: dict,
    runner: Runner,
) -> dict:
    """The text-to-image demo after its teacher and classifier: synth, LADD, evaluation, grids,
    sampler sweep, and the optional ablations and DPO recipe; returns its results (eval.json keys)."""
    from ladd_ds.config import load_config
    from ladd_ds.demo.classifier import classifier_folder
    from ladd_ds.demo.evaluate import DemoEvaluator, EvalPrompts
    from ladd_ds.models.registry import resolve_model_config

    with timed(timings, "synth"):
        data = make_data(out / "data" / "synthetic", teacher, s, "synthetic", runner=runner)
        held_out = make_held_out(out / "data" / "held_out", teacher, s, runner=runner)
    with timed(timings, "LADD train + export" + (f" ({s.train_seeds} runs)" if s.train_seeds > 1 else "")):
        validated = validation_sets(held_out, s)
        student = ladd_stage(out / "main", data=data, teacher=teacher, size=s, runner=runner, sets=validated)
        # Further training runs of the same setting (run.seed k), pooled into the student rows.
        students = [student]
        students += [
            ladd_stage(
                out / f"main_seed{k}", data=data, teacher=teacher, size=s, runner=runner, sets=[f"run.seed={k}", *validated]
            )
            for k in range(1, s.train_seeds)
        ]

    with timed(timings, "evaluation + grids"):
        prompts = EvalPrompts.draw(s.eval_prompts, seed=2024, combinations="seen", open_place=OPEN_PLACE)
        evaluator = DemoEvaluator(classifier, prompts, num_real=s.num_real)
        rows = evaluate_models(teacher, students, s, evaluator)
        # Prompts of combinations that synth and LADD never saw, with other noise seeds.
        heldout = DemoEvaluator(
            classifier, EvalPrompts.draw(s.heldout_prompts, seed=2025, combinations="held_out"), num_real=s.num_real
        )
        heldout_rows = evaluate_models(teacher, students, s, heldout, [max(s.teacher_steps), 4], s.heldout_seeds)
        grids = write_grids(out, teacher=teacher, student=student, size=s)
    sweep_rows = []
    if sampler_sweep:
        with timed(timings, "teacher sampler sweep"):
            sweep_rows = teacher_sampler_sweep(teacher, s, evaluator)
    warmup = load_config(DEMO_CONFIG).optim.warmup_steps

    ablation_rows = []
    chosen = select_ablations(ablations)
    if chosen:
        with timed(timings, "ablations"):
            baseline = "baseline (configs/demo.yaml)"
            main_separation = discriminator_separation(out / "main" / "run", warmup).get("separation")
            ablation_rows += [
                {**r, "ablation": baseline, "change": "none", "d_separation": main_separation}
                for r in rows
                if r["kind"] == "student" and r["steps"] in (1, 4)
            ]
            last_block = resolve_model_config(str(teacher))["num_layers"] - 1
            for name, what, change in chosen:
                kind = change.get("data", "synthetic")
                ablation_data = make_data(out / "data" / kind, teacher, s, kind, runner=runner)
                sets = [x.replace("LAST", str(last_block)) for x in change.get("set", [])]
                export = ladd_stage(
                    out / "ablations" / slug(name), data=ablation_data, teacher=teacher, size=s, runner=runner, sets=sets
                )
                separation = discriminator_separation(export.parent / "run", warmup).get("separation")
                for row in evaluate_models(teacher, [export], s, evaluator, teacher_steps=[]):
                    if row["steps"] in (1, 4):
                        ablation_rows.append({**row, "ablation": name, "change": what, "d_separation": separation})

    dpo_rows = []
    if dpo:
        with timed(timings, "DPO recipe"):
            classifier_dir = classifier_folder(cache, steps=s.classifier_steps)
            dpo_rows = dpo_recipe(
                out, teacher=teacher, classifier=classifier_dir, size=s, evaluator=evaluator, base_rows=rows, runner=runner
            )

    return {
        "rows": rows,
        "reference": evaluator.reference,
        "heldout_rows": heldout_rows,
        "heldout_reference": heldout.reference,
        "teacher_shift": teacher_sampler()[0],  # the main table's sampler (synth's)
        "sampler_sweep": sweep_rows,
        "heldout_combinations": sorted(label.prompt for label in digits.HELD_OUT_COMBINATIONS),
        "discriminator": discriminator_separation(out / "main" / "run", after_step=warmup),
        "discriminator_runs": [discriminator_separation(st.parent / "run", after_step=warmup) for st in students],
        "curves": training_curves(out / "main" / "run"),
        "ablations": ablation_rows,
        "dpo": dpo_rows,
        "grids": [str(g.relative_to(out)) for g in grids],
        "tensorboard": str((out / "main" / "run" / "tb").relative_to(out)),
    }


def run_demo(
    out: str | Path,
    *,
    cache: str | Path | None = None,
    size: str = "full",
    ablations: bool | list[str] = False,
    dpo: bool = False,
    sampler_sweep: bool = False,
    precision: str = "fp32",
    train_seeds: int | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    runner: Runner | None = None,
) -> Path:
    """The demo of `tasks` (of DEMO_TASKS: text-to-image, inpainting, editing) into `out`; returns
    report.md. The text-to-image teacher and the classifier are always made (the task teachers
    start from that teacher; every task is evaluated with that classifier). `runner` runs the
    command stages (default `Runner()`: each a subprocess, as a user runs it)."""
    from ladd_ds.demo.classifier import cached_classifier
    from ladd_ds.demo.report import write_report

    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown or not tasks:
        raise InputError(f"--tasks: {unknown or 'none given'}; choose from {', '.join(DEMO_TASKS)}")
    if (ablations or dpo or train_seeds or sampler_sweep) and "t2i" not in tasks:
        raise InputError("--ablations, --dpo, --sampler-sweep and --train-seeds are text-to-image stages: add t2i to --tasks")
    image_tasks = [t for t in DEMO_TASKS if t in tasks and t != "t2i"]
    out = Path(out)
    check_output(out, "demo")  # a new or empty folder, or an earlier demo's output (its finished stages are reused)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / OUTPUT_MARKER).is_file():
        write_marker(out, "demo")
    s = replace(SIZES[size], precision=precision)
    if train_seeds is not None:
        if train_seeds < 1:
            raise InputError(f"--train-seeds must be at least 1, got {train_seeds}")
        s = replace(s, train_seeds=train_seeds)
    cache = Path(cache or Path.home() / ".cache" / "ladd_ds")
    runner = Runner() if runner is None else runner
    timings: dict[str, float] = {}

    with timed(timings, "teacher pretraining") as timing:
        teacher, was_cached = cached_teacher(cache, teacher_settings(s))
        if was_cached:
            timing.key = "teacher (cached)"
    with timed(timings, "classifier"):
        classifier, classifier_info = cached_classifier(cache, steps=s.classifier_steps)

    results: dict = {
        "size": asdict(s),
        "teacher": str(teacher),
        "classifier": classifier_info,
        "num_real": s.num_real,
        "timings_s": timings,
    }
    if "t2i" in tasks:
        results |= t2i_demo(
            out,
            cache=cache,
            s=s,
            teacher=teacher,
            classifier=classifier,
            ablations=ablations,
            dpo=dpo,
            sampler_sweep=sampler_sweep,
            timings=timings,
            runner=runner,
        )
    if image_tasks:
        from ladd_ds.demo.evaluate import DemoEvaluator, EvalPrompts
        from ladd_ds.demo.task_pipeline import run_task

        # FD reference of the tasks: held-out digits of every combination, both buckets.
        real = DemoEvaluator(classifier, EvalPrompts.draw(2, seed=0), num_real=s.num_real)
        results["tasks"] = {}
        for task in image_tasks:
            with timed(timings, f"{task} (all stages)"):
                results["tasks"][task] = run_task(out, task, cache, s, classifier, real.frechet_distance, runner=runner)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    return write_report(out, results)
