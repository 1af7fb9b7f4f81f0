"""The demo's DPO recipe (`ladd-ds demo --dpo`), the paper's: `ladd-ds pairs` ranks K teacher
samples per prompt by the classifier's confidence in the asked-for digit, `ladd-ds dpo` trains a
LoRA on the teacher, `ladd-ds export --merge` gives the DPO'd teacher, LADD distills it, and
`ladd-ds export --lora` applies the same LoRA to that student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ladd_ds.demo import digits
from ladd_ds.demo.presets import OPEN_PLACE, DemoSize, teacher_sampler
from ladd_ds.demo.runner import Runner
from ladd_ds.demo.stages import export, ladd_stage, load_teacher, make_data, model_args, sampler_args, set_args

DPO_MICRO_BATCH = 32  # pairs per DPO step


def write_plain_prompts(path: Path, *, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [digits.random_label(rng, combinations="seen", open_place=OPEN_PLACE) for _ in range(n)]
    path.write_text("\n".join(label.prompt for label in labels) + "\n")
    return path


def dpo_recipe(
    out: Path, *, teacher: Path, classifier: Path, size: DemoSize, evaluator, base_rows: list[dict], runner: Runner
) -> list[dict]:
    """DPO-LoRA on the teacher -> LADD from the DPO'd teacher -> the LoRA on that student.
    Returns table rows: teacher without and with the LoRA, the main run's student, and the
    recipe's student without and with the LoRA. Each stage is skipped when its output exists."""
    work = out / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    pairs, run_dir, merged = work / "pairs", work / "run", work / "export"
    common = model_args(teacher, size.precision)
    if not (pairs / "pairs.json").is_file():
        prompts = write_plain_prompts(work / "pairs_prompts.txt", n=size.dpo_prompts, seed=13)
        sets = [f"pairs.prompts={prompts}", f"pairs.scorer_args={{classifier: {classifier}}}"]
        runner(["pairs", *common, *sampler_args(size), *set_args(sets), "--out", str(pairs)], work / "pairs.log")
    if not (merged / "ladd_dpo.json").is_file():
        num_pairs = json.loads((pairs / "pairs.json").read_text())["pairs"]
        sets = [f"data.path={pairs}", f"run.run_dir={run_dir}", f"run.max_steps={size.dpo_steps}"]
        sets.append(f"data.micro_batch_size={min(DPO_MICRO_BATCH, num_pairs)}")  # the test size has few pairs
        runner(["dpo", *common, *set_args(sets)], work / "dpo.log")
        export(run_dir, merged, merge=True)
    data = make_data(work / "data" / "synthetic", merged, size, "synthetic", runner=runner)  # the DPO'd teacher's samples
    student = ladd_stage(work / "ladd", data=data, teacher=merged, size=size, runner=runner)
    student_lora = work / "ladd" / "student_lora"
    if not (student_lora / "ladd_export.json").is_file():
        export(work / "ladd" / "run", student_lora, lora=str(merged / "lora"))

    from ladd_ds.sampling import load_sampling_model

    top = max(size.teacher_steps)
    rows = [{**r, "model": "teacher"} for r in base_rows if r["kind"] == "teacher" and r["steps"] == top]
    print(f"evaluate: teacher + DPO-LoRA {top} steps", flush=True)
    dpo_teacher = load_teacher(merged, size)
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
