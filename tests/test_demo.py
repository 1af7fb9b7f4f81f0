"""`ladd-ds demo` end to end at the test size, and the classifier the evaluation relies on."""

import json
import math
import re
from dataclasses import replace

import pytest

from ladd_ds.cli import main
from ladd_ds.core.errors import InputError
from ladd_ds.demo import digits
from ladd_ds.demo.classifier import accuracy, held_out_set, train_classifier
from ladd_ds.demo.pipeline import run_demo
from ladd_ds.demo.presets import ABLATIONS, DEMO_TASKS, SIZES, slug
from ladd_ds.demo.pretrain import PretrainSettings, cached_teacher
from ladd_ds.demo.runner import Runner
from ladd_ds.demo.t2i_eval import discriminator_separation
from tests.conftest import read_metrics

pytestmark = [pytest.mark.slow]

# Ablations run here (each is a LADD run + evaluation): the one on other data (real images,
# through `ladd-ds encode`). Every other ablation is a config override (`--set`), the path the
# second training run (`--train-seeds 2`: run.seed=1) takes too; each is checked below to be a
# valid config that sets what it says.
TESTED_ABLATIONS = ["real_data"]
# The demo's command stages (synth, encode, train, pairs, dpo) in this process: the commands' entry
# point without the ~8 s of imports a subprocess spends per stage. The subprocess path itself (the
# default runner) is tested by test_stage_subprocess_*.
IN_PROCESS = Runner(entry_point=main)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The main pipeline (two training runs pooled), then the chosen ablations on its outputs, the
    sampler sweep and the inpainting and editing tasks: `ladd-ds demo --size test --tasks all
    --train-seeds 2 --ablations real_data --sampler-sweep` with stages in process."""
    out = tmp_path_factory.mktemp("demo")
    run_demo(
        out / "run",
        cache=out / "cache",
        size="test",
        train_seeds=2,
        ablations=TESTED_ABLATIONS,
        sampler_sweep=True,
        tasks=DEMO_TASKS,
        runner=IN_PROCESS,
    )
    return out


@pytest.fixture(scope="module")
def bf16_demo(demo):
    """`demo --size test --precision bf16 --dpo` with the fp32 run's cached teacher and classifier:
    the DPO recipe and every stage in bf16."""
    run = demo / "bf16"
    run_demo(run, cache=demo / "cache", size="test", precision="bf16", dpo=True, runner=IN_PROCESS)
    return run


def test_stage_subprocess_writes_its_log(tmp_path, capsys):
    """A stage run as a subprocess (the demo's default, the user's path) prints the command and
    leaves the command's output in its log."""
    log = tmp_path / "help.log"
    Runner()(["synth", "--help"], log)
    assert "$ ladd-ds synth --help" in capsys.readouterr().out
    assert "usage: ladd-ds synth" in log.read_text()


def test_stage_subprocess_failure_names_the_stage_and_shows_the_log(tmp_path):
    log = tmp_path / "synth.log"
    with pytest.raises(RuntimeError, match=r"ladd-ds synth failed \(exit 2\).*synth\.log") as e:
        Runner()(["synth"], log)
    assert "the following arguments are required: --config" in str(e.value)  # the log's tail


def test_demo_produces_every_stage_output(demo):
    run = demo / "run"
    manifest = json.loads((run / "data" / "synthetic" / "manifest.json").read_text())
    assert manifest["synth"]["num_steps"] == SIZES["test"].synth_steps  # the size's sampler steps reached synth
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


def test_training_curves_are_the_main_runs_validations(demo):
    """The main LADD run validates every val_every steps on the held-out synth set; the report's
    training curves are its logged numbers."""
    run, size = demo / "run", SIZES["test"]
    assert json.loads((run / "data" / "held_out" / "manifest.json").read_text())["samples"] == size.val_prompts
    results = json.loads((run / "eval.json").read_text())
    curves = results["curves"]
    assert [c["step"] for c in curves] == list(range(0, size.train_steps + 1, size.val_every))  # 0: before training
    records = {r["step"]: r for r in read_metrics(run / "main" / "run") if "val/seconds" in r}
    report = (run / "report.md").read_text()
    for c in curves:
        assert c["fd_tokens"] == {str(n): records[c["step"]][f"val/fd_tokens/{n}step"] for n in (1, 2, 4)}
        fds = " | ".join(f"{c['fd_tokens'][n]:.4g}" for n in ("1", "2", "4"))
        # "–": no training step logged since the previous validation (before the first step; at the
        # test size logging.every exceeds eval.every, so only the last step is logged)
        trained = " | ".join(f"{c[k]:.3f}" if math.isfinite(c[k]) else "–" for k in ("loss_g", "loss_d", "logit_gap"))
        assert f"| {c['step']} | {trained} | {fds} |" in report
    assert math.isnan(curves[0]["loss_g"]) and math.isfinite(curves[-1]["loss_g"]) and math.isfinite(curves[-1]["logit_gap"])
    assert (run / "training_curves.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / results["tensorboard"])).Reload()
    assert "val/fd_tokens/4step" in events.Tags()["scalars"]
    assert any(tag.startswith("val/1step/") for tag in events.Tags()["images"])


def test_report_numbers_come_from_the_evaluation(demo):
    run = demo / "run"
    results = json.loads((run / "eval.json").read_text())
    for row in results["rows"]:
        assert row["finite"] and row["seeds"] == len(SIZES["test"].seeds) and row["num_images"] == results["size"]["eval_prompts"]
        assert row["runs"] == (2 if row["kind"] == "student" else 1)
        assert row["nfe"] == row["steps"] * (2 if row["kind"] == "teacher" else 1)  # CFG doubles
        assert 0.0 <= row["alignment"] <= 1.0 and row["fd"] >= 0.0 and math.isfinite(row["ms_per_image"])
    report = (run / "report.md").read_text()
    main_table = report.split("## Goals")[0]  # the held-out, ablation and DPO tables have rows of their own
    table_rows = [line for line in main_table.splitlines() if re.match(r"\| (teacher|LADD student) \| \d+ \|", line)]
    assert table_rows
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        kind = "teacher" if cells[0] == "teacher" else "student"
        row = next(r for r in results["rows"] if r["kind"] == kind and r["steps"] == int(cells[1]))
        assert cells[3] == f"{row['fd']:.2f} ± {row['fd_std']:.2f}"
        assert cells[4] == f"{row['alignment']:.3f} ± {row['alignment_std']:.3f}"
        assert cells[6] == f"{row['hue_purity']:.3f} ± {row['hue_purity_std']:.3f}"
        assert cells[7] == f"{row['background']:.2f} ± {row['background_std']:.2f}"
    # The real renders' own scores close the table: the classifier's reading and clean pixels.
    ref = results["reference"]
    assert ref["hue_purity"] == 1.0 and ref["background"] == 0.0 and 0.0 <= ref["alignment"] <= 1.0
    assert f"| held-out real renders (reference) | – | – | 0 | {ref['alignment']:.3f} |" in main_table
    assert "Student 1 step as clean as the teacher" in report


def test_student_rows_pool_the_training_runs(demo):
    """`--train-seeds 2`: a second LADD run with run.seed 1, evaluated on the same prompts and
    seeds; each student row's mean is the mean of the runs' means, and the report lists both."""
    run = demo / "run"
    assert (run / "main_seed1" / "student" / "ladd_export.json").is_file()
    train_log = (run / "main_seed1" / "run" / "config.yaml").read_text()
    assert "seed: 1" in train_log
    results = json.loads((run / "eval.json").read_text())
    report = (run / "report.md").read_text()
    assert "## The student over independent training runs" in report
    for row in (r for r in results["rows"] if r["kind"] == "student"):
        runs = row["per_run"]
        assert len(runs) == 2 and runs[0] != runs[1]  # two different students
        assert math.isclose(row["fd"], sum(r["fd"] for r in runs) / 2, rel_tol=1e-9)
        assert math.isclose(row["alignment"], sum(r["alignment"] for r in runs) / 2, rel_tol=1e-9)
        assert f"| {row['steps']} | {runs[0]['fd']:.2f} / {runs[0]['alignment']:.3f} |" in report
    assert len(results["discriminator_runs"]) == 2
    assert "training run 2 of 2" in report


def test_held_out_prompts_get_their_own_rows_and_goals(demo):
    run = demo / "run"
    results = json.loads((run / "eval.json").read_text())
    held = results["heldout_rows"]
    names = {(r["kind"], r["steps"]) for r in held}
    assert {("teacher", 4), ("student", 1), ("student", 4)} <= names
    assert all(r["num_images"] == SIZES["test"].heldout_prompts and r["finite"] for r in held)
    assert sorted(results["heldout_combinations"]) == sorted(lb.prompt for lb in digits.HELD_OUT_COMBINATIONS)
    # No held-out combination reached synth or the student's training data.
    synth_prompts = [json.loads(line)["prompt"] for line in (run / "data" / "synthetic_prompts.jsonl").read_text().splitlines()]
    assert not set(synth_prompts) & set(results["heldout_combinations"])
    report = (run / "report.md").read_text()
    assert "## Held-out prompts" in report and "## Goals" in report
    assert "Held-out prompts: Student 1 step vs teacher 4 steps" in report
    d = results["discriminator"]
    assert d["steps"] >= 1 and math.isclose(d["separation"], d["real_logit"] - d["fake_logit"])
    assert f"separation {d['separation']:+.3f}" in report


def test_discriminator_separation_reads_the_logged_logits(tmp_path):
    records = [
        {"step": 10, "d/real_logit": 0.0, "d/fake_logit": 0.0},  # warm-up: left out
        {"step": 20, "d/real_logit": 0.5, "d/fake_logit": -0.5},
        {"step": 25, "loss/generator": 1.0},  # a record without discriminator metrics
        {"step": 30, "d/real_logit": 0.25, "d/fake_logit": 0.75},
        {"step": 40, "d/real_logit": "nan", "d/fake_logit": "nan"},  # a skipped step (json keeps NaN as text)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    d = discriminator_separation(tmp_path, after_step=10)
    assert d["steps"] == 2
    assert math.isclose(d["real_logit"], 0.375) and math.isclose(d["fake_logit"], 0.125)
    assert math.isclose(d["separation"], 0.25)
    assert math.isclose(d["separation_stderr"], 0.75)  # gaps 1.0 and -0.5: std 1.06, over sqrt(2)


def test_cached_teacher_key_follows_architecture_and_data(monkeypatch):
    from ladd_ds.models.registry import PRESETS

    settings = PretrainSettings(steps=10)
    key = settings.key()
    assert PretrainSettings(steps=10).key() == key and PretrainSettings(steps=11).key() != key
    assert PretrainSettings(steps=10, open_place=0.5).key() != key
    monkeypatch.setitem(PRESETS, "demo", {**PRESETS["demo"], "num_layers": 5})
    assert settings.key() != key
    monkeypatch.undo()
    monkeypatch.setattr(digits, "BUCKETS", [(16, 16)])
    assert settings.key() != key


def test_ablations_each_get_rows(demo):
    results = json.loads((demo / "run" / "eval.json").read_text())
    names = [name for name, _, _ in ABLATIONS if slug(name) in TESTED_ABLATIONS]
    assert len(names) == len(TESTED_ABLATIONS)
    assert {r["ablation"] for r in results["ablations"]} == {"baseline (configs/demo.yaml)", *names}
    for name in names:
        rows = [r for r in results["ablations"] if r["ablation"] == name]
        assert sorted(r["steps"] for r in rows) == [1, 4] and all(r["finite"] for r in rows), name
    report = (demo / "run" / "report.md").read_text()
    assert "## Ablations" in report and all(f"| {name} | 1 |" in report for name in names)
    # The ablation really ran on its data.
    assert "data/real" in (demo / "run" / "ablations" / "real_data" / "run" / "config.yaml").read_text()


def test_every_ablation_is_a_valid_config_and_selectable(capsys):
    from ladd_ds.config import load_config
    from ladd_ds.demo.presets import DEMO_CONFIG, ablation_slugs, select_ablations

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in ablation_slugs()), "`ladd-ds demo --help` lists every ablation"

    for name, _, change in ABLATIONS:
        sets = [x.replace("LAST", "3") for x in change.get("set", [])]
        cfg = load_config(DEMO_CONFIG, ["model.teacher=demo", "data.path=x", *sets])
        for override in sets:
            key, value = override.split("=", 1)
            section, field = key.split(".")
            assert str(getattr(getattr(cfg, section), field)).replace(" ", "") == value, override
        assert select_ablations([slug(name)])[0][0] == name
    with pytest.raises(ValueError, match="--ablations: unknown"):
        select_ablations(["no_such_ablation"])


def test_dpo_recipe_runs_every_stage_and_reports(bf16_demo):
    run = bf16_demo
    pairs = json.loads((run / "dpo" / "pairs" / "pairs.json").read_text())
    assert pairs["pairs"] + pairs["skipped"] == SIZES["test"].dpo_prompts and pairs["mean_score_gap"] > 0
    assert pairs["steps"] == SIZES["test"].synth_steps
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


def test_the_pretrained_teacher_is_found_in_the_cache_afterwards(demo):
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


def test_teacher_sampler_sweep_is_reported(demo):
    """The few-step gap under other (shift, CFG) settings: each at 4 steps and the top step
    count, with the sampler's shift really changed (the rows differ from the main table's)."""
    run = demo / "run"
    results = json.loads((run / "eval.json").read_text())
    sweep = results["sampler_sweep"]
    top = max(SIZES["test"].teacher_steps)
    assert {(r["shift"], r["cfg"], r["steps"]) for r in sweep} == {
        (shift, cfg, steps) for shift, cfg in SIZES["test"].sampler_sweep for steps in (top, 4)
    }
    main_4 = next(r for r in results["rows"] if r["kind"] == "teacher" and r["steps"] == 4)
    shifted_4 = next(r for r in sweep if r["shift"] != results["teacher_shift"] and r["cfg"] == main_4["cfg"] and r["steps"] == 4)
    assert shifted_4["fd"] != main_4["fd"]
    report = (run / "report.md").read_text()
    a = next(r for r in sweep if r["shift"] == 3.0 and r["cfg"] == 1.5 and r["steps"] == top)
    b = next(r for r in sweep if r["shift"] == 3.0 and r["cfg"] == 1.5 and r["steps"] == 4)
    assert f"| 3 | 1.5 | 1 | {a['fd']:.2f} | {b['fd']:.2f} | {b['fd'] / a['fd']:.2f} |" in report


def test_bf16_demo_runs_every_stage_in_bf16(bf16_demo):
    """`demo --size test --precision bf16 --dpo`: synth, LADD on ZeRO-3 engines, export, pairs,
    DPO and the evaluation's sampling all in bf16 (the teacher and classifier of the fp32 run's
    cache); the data stores bf16 conditioning and every table row is finite."""
    from ladd_ds.data.schema import PAIRS, validate_mds_dir

    run = bf16_demo
    bucket = next(p for p in (run / "data" / "synthetic").iterdir() if (p / "index.json").is_file())
    assert validate_mds_dir(bucket)["columns"]["prompt_embeds"] == "ndarray:uint16"  # bf16 bits
    for ds_config in (run / "main" / "run" / "ds_config_student.json", run / "dpo" / "run" / "ds_config_model.json"):
        assert json.loads(ds_config.read_text())["bf16"]["enabled"], ds_config
    pairs_bucket = next(p for p in (run / "dpo" / "pairs").iterdir() if (p / "index.json").is_file())
    pairs = validate_mds_dir(pairs_bucket, PAIRS)
    assert pairs["columns"]["prompt_embeds"] == "ndarray:uint16"  # `pairs` ran its encoders in bf16
    results = json.loads((run / "eval.json").read_text())
    assert results["size"]["precision"] == "bf16" and "teacher (cached)" in results["timings_s"]
    assert all(r["finite"] for r in results["rows"] + results["dpo"])
    assert "Precision of synth, LADD, DPO and sampling: bf16." in (run / "report.md").read_text()


@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_task_tables_come_from_the_evaluation(demo, task):
    """`demo --tasks all` runs every task: the task teacher (from the cached t2i one), synth of
    the task's data, LADD with ladd.task, the export, and a table whose cells and goal line are
    the evaluation's numbers."""
    from ladd_ds.data.schema import TASK_LAYOUTS, validate_mds_dir
    from ladd_ds.demo.task_pipeline import MEASURES, STUDENT_STEPS, goal

    run = demo / "run"
    results = json.loads((run / "eval.json").read_text())
    task_results = results["tasks"][task]
    rows = task_results["rows"]
    top = max(SIZES["test"].teacher_steps)
    assert [(r["kind"], r["steps"]) for r in rows] == [("teacher", top), ("teacher", 4)] + [("student", s) for s in STUDENT_STEPS]
    for r in rows:
        assert r["seeds"] == len(SIZES["test"].seeds) and r["num_images"] == SIZES["test"].eval_prompts
        assert r["nfe"] == r["steps"] * (2 if r["kind"] == "teacher" else 1)
        values = [r["fd"], r["ms_per_image"], *(r[key] for key, _, _ in MEASURES[task])]
        assert all(math.isfinite(v) for v in values)
    assert task_results["goal"] == goal(task, rows)
    report = (run / "report.md").read_text()
    section = report.split(f"## {task}: teacher vs. LADD student")[1].split("\n## ")[0]
    for r in rows:
        name = "teacher" if r["kind"] == "teacher" else "LADD student"
        cells = " | ".join(f"{r[key]:.3f} ± {r[f'{key}_std']:.3f}" for key, _, _ in MEASURES[task])
        assert f"| {name} | {r['steps']} | {r['cfg']:g} | {r['fd']:.2f} ± {r['fd_std']:.2f} | {cells} |" in section
    ref = task_results["reference"]  # the real answers, scored by the same code
    cells = " | ".join(f"{ref[key]:.3f}" for key, _, _ in MEASURES[task])
    assert f"| real answers (reference) | – | – | {ref['fd']:.2f} | {cells} |" in section and math.isfinite(ref["fd"])
    if task == "edit":  # and per kind of edit, each weighted by its examples
        keys = [f"{m}/{k}" for m in ("preservation", "success") for k in sorted(digits.EDIT_KINDS)]
        assert "| model | steps | " + " | ".join(k.replace("/", ", ") for k in keys) + " |" in section
        for r in rows:
            name = "teacher" if r["kind"] == "teacher" else "LADD student"
            cells = " | ".join(f"{r[k]:.3f} ± {r[f'{k}_std']:.3f}" for k in keys)
            assert f"| {name} | {r['steps']} | {cells} |" in section
    assert task_results["goal"]["text"] in section
    # The stages ran what a user runs: data of the task's layout, LADD with ladd.task, an export of the task.
    bucket = next(p for p in (run / task / "data").iterdir() if (p / "index.json").is_file())
    assert set(TASK_LAYOUTS[task].required) <= set(validate_mds_dir(bucket, TASK_LAYOUTS[task])["columns"])
    assert json.loads((run / task / "data" / "manifest.json").read_text())["synth"]["num_steps"] == SIZES["test"].synth_steps
    assert f"task: {task}" in (run / task / "run" / "config.yaml").read_text()
    assert json.loads((run / task / "student" / "ladd_export.json").read_text())["sampling"]["task"] == task
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / task_results["tensorboard"])).Reload()
    assert "samples/student_1step" in events.Tags()["images"]  # previews on the first sample's condition


def test_task_goals_are_judged_on_the_rows():
    from ladd_ds.demo.task_pipeline import goal

    def row(kind, steps, **values):
        return {"kind": kind, "steps": steps, "fd": 1.0, **values}

    inpaint = [row("teacher", 50, fd=10.0), row("teacher", 4, fd=20.0), row("student", 1, fd=12.4), row("student", 4)]
    assert goal("inpaint", inpaint)["met"] and "ratio 1.24" in goal("inpaint", inpaint)["text"]
    inpaint[2]["fd"] = 12.6
    assert not goal("inpaint", inpaint)["met"]
    edit = [row("teacher", 50, success=0.8, preservation=0.9), row("student", 4, success=0.76, preservation=0.95)]
    assert goal("edit", edit)["met"]
    edit[1]["preservation"] = 0.94
    assert not goal("edit", edit)["met"]
    edit[1] |= {"preservation": 0.95, "success": 0.71}
    assert not goal("edit", edit)["met"]


def test_a_task_stage_refuses_data_of_another_teacher(tmp_path):
    from ladd_ds.core.errors import InputError
    from ladd_ds.demo.task_pipeline import check_stage_teacher

    data = tmp_path / "edit" / "data"
    check_stage_teacher(data, tmp_path / "teacher_a")  # nothing generated yet
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"source": {"model": str(tmp_path / "teacher_a")}}))
    check_stage_teacher(data, tmp_path / "teacher_a")
    with pytest.raises(InputError, match="generated by the teacher .*teacher_a, this demo's teacher is .*teacher_b"):
        check_stage_teacher(data, tmp_path / "teacher_b")


def test_a_ladd_stage_reuses_its_export_only_at_the_same_step_count(tmp_path):
    from ladd_ds.core.errors import InputError
    from ladd_ds.demo.stages import ladd_stage

    def runner(args, log):
        pytest.fail("a finished stage must not train again")

    size = replace(SIZES["test"], train_steps=300)
    export = tmp_path / "edit" / "student"
    export.mkdir(parents=True)
    (export / "ladd_export.json").write_text(json.dumps({"step": 300}))
    stage = {"data": tmp_path / "data", "teacher": tmp_path / "teacher", "size": size}
    assert ladd_stage(tmp_path / "edit", **stage, runner=runner) == export
    with pytest.raises(InputError, match="trained 300 LADD steps, this demo's stage trains 600: .*delete .*edit"):
        ladd_stage(tmp_path / "edit", **stage, runner=runner, max_steps=600)


def test_timed_records_a_finished_block_under_its_final_key():
    """The stage times of eval.json: a block's seconds under its key, or the key the block chose
    (the teacher's "(cached)"); a block that raises records nothing."""
    import time

    from ladd_ds.core.timing import timed

    timings = {"earlier": 1.0}
    start = time.perf_counter()
    with timed(timings, "synth"):
        time.sleep(0.01)
    outer = time.perf_counter() - start
    with timed(timings, "teacher pretraining") as timing:
        timing.key = "teacher (cached)"
    with pytest.raises(KeyError), timed(timings, "failed"):
        raise KeyError("stage")
    assert list(timings) == ["earlier", "synth", "teacher (cached)"]
    assert 0.01 <= timings["synth"] <= outer


def test_demo_tasks_default_to_text_to_image_and_all_names_every_task(monkeypatch):
    """A newcomer's `ladd-ds demo --out DIR` runs the text-to-image task only; `--tasks all` and a
    list choose the others, and the sampler sweep is one flag away."""
    import ladd_ds.demo.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_demo", lambda out, **kw: calls.append(kw) or out)
    for argv in ([], ["--tasks", "all", "--sampler-sweep"], ["--tasks", "t2i, edit"]):
        assert main(["demo", "--out", "x", *argv]) == 0
    assert [c["tasks"] for c in calls] == [["t2i"], list(DEMO_TASKS), ["t2i", "edit"]]
    assert [c["sampler_sweep"] for c in calls] == [False, True, False]
    with pytest.raises(InputError, match="--sampler-sweep"):
        run_demo("unused", tasks=["edit"], sampler_sweep=True)
