"""`ladd-ds demo --out DIR`: the whole LADD pipeline on the colored-digits task, on a CPU.

Stages (each skipped when its output is already complete, so an interrupted demo continues):
  1. teacher     `ladd-ds pretrain-teacher` result, cached under --cache (keyed by its settings)
  2. classifier  the evaluation's digit/color/place classifier, cached likewise
  3. synth       `ladd-ds synth`: the teacher generates the LADD training latents (CFG)
  4. train       `ladd-ds train --config configs/demo.yaml`: LADD (TensorBoard in the run dir)
  5. export      `ladd-ds export`: the student as a diffusers folder
  6. evaluate    teacher at 1..50 steps and student at 1, 2, 4 steps, 3 seeds each
  7. report      DIR/report.md, DIR/fd_vs_steps.png, DIR/grids/*.png, DIR/eval.json
Stages 3-4 run the real command-line tools as subprocesses, exactly as a user would; the export
(stage 5) runs in this process through the function the `ladd-ds export` command calls.
With --ablations, stages 3-6 are repeated for each ablation setting (a second table);
`--ablations real_data,re_noise_m_0` runs only the named ones (`ablation_slugs()`).
With --dpo, the paper's DPO recipe follows (`dpo_recipe`): `ladd-ds pairs` ranks K teacher
samples per prompt by the classifier's confidence in the asked-for digit, `ladd-ds dpo` trains a
LoRA on the teacher, `ladd-ds export --merge` gives the DPO'd teacher, LADD distills it, and
`ladd-ds export --lora` applies the same LoRA to that student (a third table).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ladd_ds.core.errors import InputError
from ladd_ds.core.outputs import OUTPUT_MARKER, check_output, write_marker
from ladd_ds.demo import digits
from ladd_ds.demo.pretrain import PretrainSettings

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DPO_MICRO_BATCH = 32  # pairs per DPO step
# Share of the demo's prompts (teacher pretraining, synth, evaluation, real images, DPO pairs) that
# leave the place open ("a red seven"): see digits.random_label and README, "The demo".
OPEN_PLACE = 0.0
# The stages that are commands (synth, encode, train, pairs, dpo) run as subprocesses, as a user
# runs them. The tests set this to the commands' entry point (ladd_ds.cli.main) to run them in
# the demo's process instead, without the ~8 s of imports each subprocess spends.
IN_PROCESS_ENTRY_POINT: Callable[[list[str]], int] | None = None
DEMO_TASKS = ("t2i", "inpaint", "edit")  # `ladd-ds demo --tasks`, all by default
LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


@dataclass
class DemoSize:
    pretrain_steps: int
    classifier_steps: int
    synth_prompts: int
    train_steps: int
    eval_prompts: int
    num_real: int
    seeds: list[int]
    teacher_steps: list[int]  # the table needs 50 (or the largest), 4 and 1
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    grid_prompts: int = 8
    grid_columns: int = 6
    sample_every: int = 100
    dpo_prompts: int = 320  # prompts ranked by `ladd-ds pairs` (K samples each): each of the 140 about twice
    dpo_steps: int = 150
    heldout_prompts: int = 96  # prompts of digits.HELD_OUT_COMBINATIONS, never in synth or LADD training
    heldout_seeds: list[int] = field(default_factory=lambda: [10, 11, 12])  # noise seeds the main table never uses
    # Other (schedule shift, CFG) settings of the teacher's sampler, each at 4 steps and the top step
    # count with the first seed: does the few-step gap depend on the sampler? The main table's
    # sampler is synth's (teacher_sampler()).
    sampler_sweep: list[tuple[float, float]] = field(default_factory=lambda: [(3.0, 3.0), (1.0, 1.5), (3.0, 1.5)])
    # Independent LADD runs of the main table (run.seed 0, 1, ...: heads, noise draws, data order),
    # pooled in the student rows: one run's margins move by more than some goals' gaps.
    train_seeds: int = 1
    # deepspeed.precision of every stage after the (fp32-pretrained) teacher: synth, LADD, export,
    # pairs, DPO, and the sampling of the evaluation (`ladd-ds demo --precision`).
    precision: str = "fp32"
    # Pretraining steps of the inpainting and editing teachers (from the text-to-image teacher);
    # None: pretrain.TASK_SETTINGS.
    task_pretrain_steps: int | None = None
    # LADD steps of the task students ({task: steps}); a task not listed trains `train_steps`.
    task_train_steps: dict[str, int] = field(default_factory=dict)


SIZES = {
    "full": DemoSize(
        pretrain_steps=3000,
        classifier_steps=1000,
        synth_prompts=1024,
        train_steps=300,
        eval_prompts=192,
        num_real=1000,
        seeds=[0, 1, 2],
        teacher_steps=[1, 2, 4, 8, 50],
        # The 1-step inpainting student after 300 steps: FD 1.27x the 50-step teacher's; after 600:
        # 0.68x (README, "Inpainting and editing in the demo").
        task_train_steps={"inpaint": 600},
    ),
    # The test suite's version: every stage runs and produces its outputs, in minutes.
    "test": DemoSize(
        pretrain_steps=8,
        classifier_steps=30,
        synth_prompts=64,
        train_steps=4,
        eval_prompts=16,
        num_real=64,
        seeds=[0, 1, 2],
        teacher_steps=[1, 4, 8],
        grid_prompts=2,
        grid_columns=2,
        sample_every=2,
        dpo_prompts=8,
        dpo_steps=2,
        heldout_prompts=8,
        task_pretrain_steps=4,
    ),
}

# Each ablation: a name, what it changes, and the `--set` overrides of the LADD run.
ABLATIONS = [
    ("real data", "trained on encoded real training images instead of teacher samples", {"data": "real"}),
    ("re-noise m=1 (paper)", "ladd.renoise_m = 1", {"set": ["ladd.renoise_m=1.0"]}),
    ("re-noise m=0", "ladd.renoise_m = 0", {"set": ["ladd.renoise_m=0.0"]}),
    ("heads on last block only", "discriminator.taps = [last block]", {"set": ["discriminator.taps=[LAST]"]}),
    ("without distillation loss", "ladd.distill_weight = 0", {"set": ["ladd.distill_weight=0.0"]}),
    ("unguided distillation target", "ladd.distill_cfg = 1 (default: the data's CFG)", {"set": ["ladd.distill_cfg=1.0"]}),
    # The paper's .7/.1/.1/.1 trains the times a 4-step sampler visits after the first (.75, .5,
    # .25) on 30% of the samples: does that explain a student that is worse at 4 steps than at 1?
    (
        "uniform student timesteps",
        "ladd.student_probs = [.25, .25, .25, .25] (default: .7/.1/.1/.1)",
        {"set": ["ladd.student_probs=[0.25,0.25,0.25,0.25]"]},
    ),
]


def teacher_settings(size: DemoSize) -> PretrainSettings:
    """The demo teacher's pretraining settings at `size` (also `ladd-ds pretrain-teacher`'s)."""
    return replace(PretrainSettings(), steps=size.pretrain_steps, open_place=OPEN_PLACE)


def ablation_slugs() -> list[str]:
    """The names `--ablations NAME,...` takes: each ablation's name as a slug (e.g. real_data)."""
    return [slug(name) for name, _, _ in ABLATIONS]


def select_ablations(ablations: bool | list[str]) -> list[tuple]:
    """The ABLATIONS entries to run: all (True), none (False) or those named by slug."""
    if ablations is True or ablations is False:
        return list(ABLATIONS) if ablations else []
    unknown = sorted(set(ablations) - set(ablation_slugs()))
    if unknown:
        raise InputError(f"--ablations: unknown {unknown}; the ablations are {', '.join(ablation_slugs())}")
    return [a for a in ABLATIONS if slug(a[0]) in ablations]


def teacher_sampler() -> tuple[float, float]:
    """(schedule shift, CFG scale) of the teacher everywhere in the demo: the sampler synth
    generates the LADD data with (configs/demo.yaml, synth.shift and synth.guidance_scale), so
    the teacher rows show the very teacher the student learns from."""
    from ladd_ds.config import load_config

    synth = load_config(DEMO_CONFIG).synth
    return synth.shift, synth.guidance_scale


def load_teacher(folder: Path, size: DemoSize):
    """The teacher (or a DPO'd teacher) as a sampling model with the demo's sampler shift."""
    from ladd_ds.sampling import load_sampling_model

    tm = load_sampling_model(folder, precision=size.precision)
    tm.shift = teacher_sampler()[0]
    return tm


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _run(args: list[str], log: Path) -> None:
    """Run a ladd-ds command as a subprocess (the user's path), its output in `log`; in this
    process instead when IN_PROCESS_ENTRY_POINT is set (see there)."""
    print(f"$ ladd-ds {' '.join(args)}   (log: {log})", flush=True)
    if IN_PROCESS_ENTRY_POINT is not None:
        returncode = _run_in_process(IN_PROCESS_ENTRY_POINT, args, log)
    else:
        cmd = [sys.executable, "-m", "ladd_ds", *args]
        # Each stage is its own one-process job: drop rendezvous variables of any enclosing job (an
        # inherited MASTER_PORT that this process already listens on fails with EADDRINUSE).
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        with log.open("w") as f:
            returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"ladd-ds {args[0]} failed (exit {returncode}); last lines of {log}:\n{tail}")


def _run_in_process(main: Callable[[list[str]], int], args: list[str], log: Path) -> int:
    """`ladd-ds ARGS` through the commands' entry point `main` in this process, as a job of one
    rank (it joins this process's group, or starts one); Python-level output goes to `log`.
    Returns the command's exit code."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError("demo stages run in process only outside a multi-rank job")
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return main(args)


def _export(run_dir: Path, out: Path, **options) -> Path:
    """`ladd-ds export --run RUN_DIR --out OUT [options]`, in this process: unlike the training and
    generating stages it starts no distributed job and leaves no state behind (it reads the
    checkpoint and writes a folder), so a subprocess would only add its start-up."""
    from ladd_ds.export import export_run

    options.setdefault("dtype", "fp32")  # the demo evaluates and distils in fp32 on CPU
    flags = "".join(f" --{k} {v}" if v is not True else f" --{k}" for k, v in options.items())
    print(f"$ ladd-ds export --run {run_dir} --out {out}{flags}", flush=True)
    return export_run(run_dir, out, **options)


def write_prompt_file(path: Path, n: int, seed: int) -> Path:
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


def write_real_images(folder: Path, n: int, seed: int) -> tuple[Path, Path]:
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


def make_data(data: Path, teacher: Path, size: DemoSize, kind: str) -> Path:
    """The LADD training shards: teacher samples (`ladd-ds synth`) or, for the real-data
    ablation, rendered training images (`ladd-ds encode`). Skipped when already complete."""
    if (data / "manifest.json").is_file():
        return data
    data.parent.mkdir(parents=True, exist_ok=True)
    common = _model_args(teacher, size.precision)
    if kind == "real":
        images, captions = write_real_images(data.with_name(data.name + "_images"), size.synth_prompts, seed=7)
        _run(
            ["encode", *common, "--images", str(images), "--captions", str(captions), "--out", str(data)],
            data.with_suffix(".log"),
        )
    else:
        prompts = write_prompt_file(data.with_name(data.name + "_prompts.jsonl"), size.synth_prompts, seed=11)
        _run(["synth", *common, "--prompts", str(prompts), "--out", str(data)], data.with_suffix(".log"))
    return data


def _set_args(sets: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for s in sets for arg in ("--set", s)]


def _model_args(teacher: Path, precision: str) -> list[str]:
    sets = [f"model.teacher={teacher}", f"text.encoders={teacher}", f"deepspeed.precision={precision}"]
    return ["--config", str(DEMO_CONFIG), *_set_args(sets)]


def ladd_stage(work: Path, data: Path, teacher: Path, size: DemoSize, extra_sets: list[str]) -> Path:
    """LADD training on `data`, then export; skipped when the export exists and was trained as
    many steps as this stage asks (another count is an error: the stage would be stale). Returns
    the export."""
    run_dir, export = work / "run", work / "student"
    sets = [f"data.path={data}", f"run.run_dir={run_dir}", f"run.max_steps={size.train_steps}"]
    sets += [f"logging.sample_every={size.sample_every}", *extra_sets]
    if (export / "ladd_export.json").is_file():
        trained = json.loads((export / "ladd_export.json").read_text()).get("step")
        planned = int([x for x in sets if x.startswith("run.max_steps=")][-1].split("=", 1)[1])
        if trained != planned:
            raise InputError(
                f"{export} holds a student trained {trained} LADD steps, this demo's stage trains {planned}: "
                f"use another --out, or delete {work} to train it again"
            )
        return export
    work.mkdir(parents=True, exist_ok=True)
    _run(["train", *_model_args(teacher, size.precision), *_set_args(sets)], work / "train.log")
    _export(run_dir, export)
    return export


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


def write_grids(out: Path, teacher: Path, student: Path, size: DemoSize) -> list[Path]:
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
        images, _ = generate(
            model,
            [prompts[i] for i in index],
            seeds,
            height=digits.BUCKETS[0][0],
            width=digits.BUCKETS[0][1],
            steps=steps,
            cfg=cfg,
        )
        name = f"{model.kind}_{steps}steps"
        written.append(save_samples(out / "grids" / name, images, index, seeds, prompts, rows=len(prompts))[0])
    return written


def write_plain_prompts(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [digits.random_label(rng, combinations="seen", open_place=OPEN_PLACE) for _ in range(n)]
    path.write_text("\n".join(label.prompt for label in labels) + "\n")
    return path


def dpo_recipe(out: Path, teacher: Path, classifier: Path, size: DemoSize, evaluator, base_rows: list[dict]) -> list[dict]:
    """DPO-LoRA on the teacher -> LADD from the DPO'd teacher -> the LoRA on that student.
    Returns table rows: teacher without and with the LoRA, the main run's student, and the
    recipe's student without and with the LoRA. Each stage is skipped when its output exists."""
    work = out / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    pairs, run_dir, export = work / "pairs", work / "run", work / "export"
    common = _model_args(teacher, size.precision)
    if not (pairs / "pairs.json").is_file():
        prompts = write_plain_prompts(work / "pairs_prompts.txt", size.dpo_prompts, seed=13)
        sets = [f"pairs.prompts={prompts}", f"pairs.scorer_args={{classifier: {classifier}}}"]
        _run(["pairs", *common, *_set_args(sets), "--out", str(pairs)], work / "pairs.log")
    if not (export / "ladd_dpo.json").is_file():
        num_pairs = json.loads((pairs / "pairs.json").read_text())["pairs"]
        sets = [f"data.path={pairs}", f"run.run_dir={run_dir}", f"run.max_steps={size.dpo_steps}"]
        sets.append(f"data.micro_batch_size={min(DPO_MICRO_BATCH, num_pairs)}")  # the test size has few pairs
        _run(["dpo", *common, *_set_args(sets)], work / "dpo.log")
        _export(run_dir, export, merge=True)
    data = make_data(work / "data" / "synthetic", export, size, "synthetic")  # the DPO'd teacher's samples
    student = ladd_stage(work / "ladd", data, export, size, [])
    student_lora = work / "ladd" / "student_lora"
    if not (student_lora / "ladd_export.json").is_file():
        _export(work / "ladd" / "run", student_lora, lora=str(export / "lora"))

    from ladd_ds.sampling import load_sampling_model

    top = max(size.teacher_steps)
    rows = [{**r, "model": "teacher"} for r in base_rows if r["kind"] == "teacher" and r["steps"] == top]
    print(f"evaluate: teacher + DPO-LoRA {top} steps", flush=True)
    dpo_teacher = load_teacher(export, size)
    rows.append(
        {
            **evaluator.evaluate("dpo teacher", dpo_teacher, top, teacher_sampler()[1], size.seeds).summary(),
            "model": "teacher + DPO-LoRA",
        }
    )
    rows += [{**r, "model": "LADD student"} for r in base_rows if r["kind"] == "student" and r["steps"] in (1, 4)]
    for name, folder in (("LADD student of the DPO'd teacher", student), ("... + DPO-LoRA (recipe)", student_lora)):
        sm = load_sampling_model(folder, precision=size.precision)
        for steps in (1, 4):
            print(f"evaluate: {name} {steps} steps", flush=True)
            rows.append({**evaluator.evaluate(name, sm, steps, 1.0, size.seeds).summary(), "model": name})
    return rows


def t2i_demo(out: Path, cache: Path, s: DemoSize, teacher: Path, classifier, ablations, dpo: bool, timings: dict) -> dict:
    """The text-to-image demo after its teacher and classifier: synth, LADD, evaluation, grids,
    sampler sweep, and the optional ablations and DPO recipe; returns its results (eval.json keys)."""
    from ladd_ds.config import load_config
    from ladd_ds.demo.classifier import classifier_folder
    from ladd_ds.demo.evaluate import DemoEvaluator, EvalPrompts
    from ladd_ds.models.registry import resolve_model_config

    t0 = time.time()
    data = make_data(out / "data" / "synthetic", teacher, s, "synthetic")
    timings["synth"] = time.time() - t0
    t0 = time.time()
    student = ladd_stage(out / "main", data, teacher, s, [])
    # Further training runs of the same setting (run.seed k), pooled into the student rows.
    students = [student]
    students += [ladd_stage(out / f"main_seed{k}", data, teacher, s, [f"run.seed={k}"]) for k in range(1, s.train_seeds)]
    timings["LADD train + export" + (f" ({s.train_seeds} runs)" if s.train_seeds > 1 else "")] = time.time() - t0

    t0 = time.time()
    prompts = EvalPrompts.draw(s.eval_prompts, seed=2024, combinations="seen", open_place=OPEN_PLACE)
    evaluator = DemoEvaluator(classifier, prompts, num_real=s.num_real)
    rows = evaluate_models(teacher, students, s, evaluator)
    # Prompts of combinations that synth and LADD never saw, with other noise seeds.
    heldout = DemoEvaluator(
        classifier, EvalPrompts.draw(s.heldout_prompts, seed=2025, combinations="held_out"), num_real=s.num_real
    )
    heldout_rows = evaluate_models(teacher, students, s, heldout, [max(s.teacher_steps), 4], s.heldout_seeds)
    grids = write_grids(out, teacher, student, s)
    timings["evaluation + grids"] = time.time() - t0
    t0 = time.time()
    sweep_rows = teacher_sampler_sweep(teacher, s, evaluator)
    timings["teacher sampler sweep"] = time.time() - t0
    warmup = load_config(DEMO_CONFIG).optim.warmup_steps

    ablation_rows = []
    chosen = select_ablations(ablations)
    if chosen:
        t0 = time.time()
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
            ablation_data = make_data(out / "data" / kind, teacher, s, kind)
            sets = [x.replace("LAST", str(last_block)) for x in change.get("set", [])]
            export = ladd_stage(out / "ablations" / slug(name), ablation_data, teacher, s, sets)
            separation = discriminator_separation(export.parent / "run", warmup).get("separation")
            for row in evaluate_models(teacher, [export], s, evaluator, teacher_steps=[]):
                if row["steps"] in (1, 4):
                    ablation_rows.append({**row, "ablation": name, "change": what, "d_separation": separation})
        timings["ablations"] = time.time() - t0

    dpo_rows = []
    if dpo:
        t0 = time.time()
        dpo_rows = dpo_recipe(out, teacher, classifier_folder(cache, s.classifier_steps), s, evaluator, rows)
        timings["DPO recipe"] = time.time() - t0

    return {
        "rows": rows,
        "heldout_rows": heldout_rows,
        "teacher_shift": teacher_sampler()[0],  # the main table's sampler (synth's)
        "sampler_sweep": sweep_rows,
        "heldout_combinations": sorted(label.prompt for label in digits.HELD_OUT_COMBINATIONS),
        "discriminator": discriminator_separation(out / "main" / "run", after_step=warmup),
        "discriminator_runs": [discriminator_separation(st.parent / "run", after_step=warmup) for st in students],
        "ablations": ablation_rows,
        "dpo": dpo_rows,
        "grids": [str(g.relative_to(out)) for g in grids],
        "tensorboard": str((out / "main" / "run" / "tb").relative_to(out)),
    }


def run_demo(
    out: str | Path,
    cache: str | Path | None = None,
    size: str = "full",
    ablations: bool | list[str] = False,
    dpo: bool = False,
    precision: str = "fp32",
    train_seeds: int | None = None,
    tasks: list[str] | tuple[str, ...] = DEMO_TASKS,
) -> Path:
    """The demo of `tasks` (DEMO_TASKS: text-to-image, inpainting, editing) into `out`; returns
    report.md. The text-to-image teacher and the classifier are always made (the task teachers
    start from that teacher; every task is evaluated with that classifier)."""
    from ladd_ds.demo.classifier import cached_classifier
    from ladd_ds.demo.pretrain import cached_teacher
    from ladd_ds.demo.report import write_report

    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown or not tasks:
        raise InputError(f"--tasks: {unknown or 'none given'}; choose from {', '.join(DEMO_TASKS)}")
    if (ablations or dpo or train_seeds) and "t2i" not in tasks:
        raise InputError("--ablations, --dpo and --train-seeds are text-to-image stages: add t2i to --tasks")
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
    timings: dict[str, float] = {}

    t0 = time.time()
    teacher, was_cached = cached_teacher(cache, teacher_settings(s))
    timings["teacher (cached)" if was_cached else "teacher pretraining"] = time.time() - t0
    t0 = time.time()
    classifier, classifier_info = cached_classifier(cache, steps=s.classifier_steps)
    timings["classifier"] = time.time() - t0

    results: dict = {
        "size": asdict(s),
        "teacher": str(teacher),
        "classifier": classifier_info,
        "num_real": s.num_real,
        "timings_s": timings,
    }
    if "t2i" in tasks:
        results |= t2i_demo(out, cache, s, teacher, classifier, ablations, dpo, timings)
    if image_tasks:
        from ladd_ds.demo.evaluate import DemoEvaluator, EvalPrompts
        from ladd_ds.demo.task_pipeline import Stages, run_task

        stages = Stages(_run, _model_args, ladd_stage, load_teacher, teacher_settings, teacher_sampler)

        # FD reference of the tasks: held-out digits of every combination, both buckets.
        real = DemoEvaluator(classifier, EvalPrompts.draw(2, seed=0), num_real=s.num_real)
        results["tasks"] = {}
        for task in image_tasks:
            t0 = time.time()
            results["tasks"][task] = run_task(out, task, cache, s, classifier, real.frechet_distance, stages)
            timings[f"{task} (all stages)"] = time.time() - t0
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    return write_report(out, results)
