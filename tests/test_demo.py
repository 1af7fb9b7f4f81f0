"""`ladd-ds demo` end to end at the test size, and the classifier the evaluation relies on."""

import json
import math
import re
from dataclasses import replace

import pytest

from evaluation.digit_classifier import accuracy, held_out_set, train_classifier
from ladd_ds.cli import main
from ladd_ds.demo import digits
from ladd_ds.demo.pipeline import ABLATIONS, SIZES
from ladd_ds.demo.pretrain import PretrainSettings, cached_teacher


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(out / "run"), "--cache", str(out / "cache"), "--size", "test", "--ablations", "--dpo"]
    assert main(args) == 0
    return out


def test_demo_produces_every_stage_output(demo):
    run = demo / "run"
    assert (run / "data" / "synthetic" / "manifest.json").is_file()
    assert list((run / "main" / "run" / "checkpoints").glob("step-*"))
    assert (run / "main" / "student" / "ladd_export.json").is_file()
    assert (run / "report.md").is_file() and (run / "fd_vs_steps.png").stat().st_size > 0
    results = json.loads((run / "eval.json").read_text())
    names = {(r["kind"], r["steps"]) for r in results["rows"]}
    assert {("teacher", 1), ("teacher", 4), ("student", 1), ("student", 2), ("student", 4)} <= names
    for grid in results["grids"]:
        assert (run / grid).is_file() and (run / grid).with_suffix(".npz").is_file()
    # TensorBoard got sample grids during training, next to the scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / results["tensorboard"])).Reload()
    assert "samples/student_1step" in events.Tags()["images"]
    assert "loss/generator" in events.Tags()["scalars"]


def test_report_numbers_come_from_the_evaluation(demo):
    run = demo / "run"
    results = json.loads((run / "eval.json").read_text())
    for row in results["rows"]:
        assert row["finite"] and row["seeds"] == 3 and row["num_images"] == results["size"]["eval_prompts"]
        assert row["nfe"] == row["steps"] * (2 if row["kind"] == "teacher" else 1)  # CFG 3 doubles
        assert 0.0 <= row["alignment"] <= 1.0 and row["fd"] >= 0.0 and math.isfinite(row["ms_per_image"])
    report = (run / "report.md").read_text()
    table_rows = [line for line in report.splitlines() if re.match(r"\| (teacher|LADD student) \| \d+ \|", line)]
    assert table_rows
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        kind = "teacher" if cells[0] == "teacher" else "student"
        row = next(r for r in results["rows"] if r["kind"] == kind and r["steps"] == int(cells[1]))
        assert cells[3] == f"{row['fd']:.2f} ± {row['fd_std']:.2f}"
        assert cells[4] == f"{row['alignment']:.3f} ± {row['alignment_std']:.3f}"


def test_ablations_each_get_rows(demo):
    results = json.loads((demo / "run" / "eval.json").read_text())
    names = [a[0] for a in ABLATIONS]
    for name in names:
        rows = [r for r in results["ablations"] if r["ablation"] == name]
        assert sorted(r["steps"] for r in rows) == [1, 4] and all(r["finite"] for r in rows), name
    report = (demo / "run" / "report.md").read_text()
    assert "## Ablations" in report and all(f"| {name} | 1 |" in report for name in names)
    # Each ablation really ran with its setting.
    config = (demo / "run" / "ablations" / "re_noise_m_0" / "run" / "config.yaml").read_text()
    assert "renoise_m: 0.0" in config


def test_dpo_recipe_runs_every_stage_and_reports(demo):
    run = demo / "run"
    pairs = json.loads((run / "dpo" / "pairs" / "pairs.json").read_text())
    assert pairs["pairs"] + pairs["dropped_ties"] == SIZES["test"].dpo_prompts and pairs["mean_score_gap"] > 0
    assert (run / "dpo" / "export" / "lora" / "adapter_config.json").is_file()
    assert (run / "dpo" / "export" / "transformer" / "config.json").is_file()  # the merged teacher
    lora_export = json.loads((run / "dpo" / "ladd" / "student_lora" / "ladd_export.json").read_text())
    assert lora_export["lora_merged"].endswith("lora")
    train_config = (run / "dpo" / "ladd" / "run" / "config.yaml").read_text()
    assert str(run / "dpo" / "export") in train_config  # LADD distilled the DPO'd teacher
    results = json.loads((run / "eval.json").read_text())
    models = [r["model"] for r in results["dpo"]]
    assert models.count("teacher + DPO-LoRA") == 1 and models.count("... + DPO-LoRA (recipe)") == 2
    assert all(r["finite"] for r in results["dpo"])
    report = (run / "report.md").read_text()
    assert "## DPO recipe" in report and "Teacher alignment at" in report


def test_second_demo_run_reuses_the_cached_teacher(demo):
    timings = json.loads((demo / "run" / "eval.json").read_text())["timings_s"]
    assert "teacher pretraining" in timings  # the first run trained it
    settings = replace(PretrainSettings(), steps=SIZES["test"].pretrain_steps)
    folder, was_cached = cached_teacher(demo / "cache", settings)
    assert was_cached and folder.parent == demo / "cache"


def test_classifier_reads_held_out_digits():
    """Alignment means something only if the judge is right on real images it never saw."""
    model, _ = train_classifier(steps=SIZES["full"].classifier_steps)  # what the full demo uses
    for bucket in digits.BUCKETS:
        images, labels = held_out_set(500, seed=99, bucket=bucket)  # other held-out draws than its own check
        acc = accuracy(model, images, labels)
        assert acc["color"] > 0.98 and acc["place"] > 0.98, acc
        assert acc["digit"] > 0.88, acc  # chance: 0.10
