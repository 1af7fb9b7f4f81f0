"""End to end through the `ladd-ds train` command: logs, checkpoints, exact resume, 2 ranks."""

import json
import re

import pytest
import torch

from ladd_ds.training.trainer import number
from tests.conftest import TINY_CONFIG, copy_run_until, read_metrics, run_cli

FAST = ["--set", "logging.progress_bar=false", "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=2"]
LOSSES = ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit")


def train(run_dir, max_steps, *extra, nproc=1):
    return run_cli(
        "train",
        "--config",
        str(TINY_CONFIG),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(max_steps),
        *FAST,
        *extra,
        nproc=nproc,
        launcher="in-process" if nproc == 1 else "direct",
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir, 6)
    return run_dir


def test_run_writes_metrics_tensorboard_checkpoints_and_configs(uninterrupted):
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the tiny config logs every step
    required = {"step", "lr/student", "throughput/img_per_s", *LOSSES}
    assert all(required <= r.keys() for r in records)
    assert all(r["throughput/img_per_s"] > 0 for r in records)
    assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]  # keep_last=2 pruned step 2
    final = uninterrupted / "checkpoints" / "step-00000006"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 6
    assert (final / "student").is_dir() and (final / "heads").is_dir() and (final / "rank-00000.pt").is_file()
    assert (uninterrupted / "config.yaml").is_file()
    ds_student = json.loads((uninterrupted / "ds_config_student.json").read_text())
    assert ds_student["zero_optimization"]["stage"] == 3 and ds_student["train_batch_size"] == 4
    assert ds_student["gradient_clipping"] == 1.0
    # Linear LR warm-up over 5 optimizer steps (logged after each step's scheduler update).
    assert [r["lr/student"] for r in records] == pytest.approx([4e-5, 6e-5, 8e-5, 1e-4, 1e-4, 1e-4])


def test_resume_equals_uninterrupted_and_skips_partial_checkpoints(tmp_path, uninterrupted):
    train(tmp_path, 3)  # ends with a checkpoint at step 3 (max_steps is not a multiple of 2)
    assert (tmp_path / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    # A crash mid-save leaves a temporary dir; a dir without trainer_state.json is incomplete too.
    (tmp_path / "checkpoints" / ".step-00000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-00000005" / "student").mkdir(parents=True)
    out = train(tmp_path, 6)
    assert "resumed from" in out.stdout and "step-00000003 at step 3" in out.stdout
    resumed = read_metrics(tmp_path)
    reference = read_metrics(uninterrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(resumed[3:], reference[3:]):
        for key in LOSSES:
            assert got[key] == want[key], (got["step"], key)
    assert (tmp_path / "checkpoints" / "step-00000006" / "trainer_state.json").is_file()
    # The EMA of the student (tiny config: decay 0.99) was restored and continued identically.
    ema_resumed = torch.load(tmp_path / "checkpoints" / "step-00000006" / "rank-00000.pt")["ema"]["shadow"]
    ema_reference = torch.load(uninterrupted / "checkpoints" / "step-00000006" / "rank-00000.pt")["ema"]["shadow"]
    assert ema_resumed.keys() == ema_reference.keys()
    for key in ema_reference:
        assert torch.equal(ema_resumed[key], ema_reference[key]), key
    # The save at step 4 cleared the stale temporary directory before writing its own.
    assert not (tmp_path / "checkpoints" / ".step-00000004.tmp").exists()


def tensorboard_steps(run_dir) -> dict[str, list[int]]:
    """Each scalar's steps as TensorBoard shows them (its EventAccumulator applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def written_steps(run_dir, tag: str) -> list[int]:
    """The steps of `tag` in the event files as written, every file in order, purges not applied."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(path)).Load() if any(v.tag == tag for v in e.summary.value)]
    return steps


def test_resume_logs_plain_lines_and_tensorboard_shows_each_step_once(tmp_path, uninterrupted):
    # The run as it was at its checkpoint at step 4, with the metrics, events and log lines it
    # wrote up to step 6 (an interrupted run): the resumed run trains steps 5 and 6 again.
    run_dir = copy_run_until(uninterrupted, tmp_path / "run", 4)
    out = train(run_dir, 6).stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # Plain lines (logging.progress_bar=false), one per logged step, the values of metrics.jsonl.
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, out
    for line, record in zip(lines, records[4:]):
        want = rf"step {record['step']}/6 \| loss/generator {number(record['loss/generator'])} \| "
        want += rf"loss/discriminator {number(record['loss/discriminator'])} \| [\d.]+ img/s \| eta \d+s"
        assert re.fullmatch(want, line), line
    # TensorBoard: steps 5 and 6 were written by both runs, and are shown once.
    assert written_steps(run_dir, "loss/generator") == [1, 2, 3, 4, 5, 6, 5, 6]
    shown = tensorboard_steps(run_dir)
    assert {"loss/generator", "loss/discriminator", "lr/student"} <= shown.keys()
    for tag, steps in shown.items():
        assert steps == [1, 2, 3, 4, 5, 6], tag
    # train.log: both starts, each with its header, and both runs' lines.
    log = (run_dir / "train.log").read_text().splitlines()
    headers = [line for line in log if line.startswith("=== ")]
    assert len(headers) == 2 and "world size 1" in headers[1], headers
    assert headers[0].endswith("| starts at step 0") and headers[1].endswith("| resumes from step 4")
    resumed = log[log.index(headers[1]) :]
    assert [line for line in resumed if line.startswith("step ")] == lines
    assert any(line.startswith("resumed from ") for line in resumed) and resumed[-1] == f"done: step 6, run directory {run_dir}"
    assert sum(line.startswith("step 5/6 |") for line in log) == 2  # the interrupted run's too


def test_plain_lines_every_logging_every_steps_when_stdout_is_no_terminal_bf16(tmp_path):
    """The progress bar on, stdout not a terminal (a job's output file): lines at every
    `logging.every`-th step and the last, in bf16."""
    sets = ["logging.progress_bar=true", "logging.every=2", "deepspeed.precision=bf16"]
    out = train(tmp_path, 3, *[arg for s in sets for arg in ("--set", s)]).stdout
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 3]
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[:2] for line in lines] == [
        [f"step {r['step']}/3", f"loss/generator {number(r['loss/generator'])}"] for r in records
    ]
    assert all(re.search(r" \| \d[\d.]* img/s \| eta \d+s$", line) for line in lines), lines
    log = (tmp_path / "train.log").read_text().splitlines()
    assert [line for line in log if line.startswith("step ")] == lines


def test_dry_run_prints_parameter_counts_and_memory_plan(tmp_path):
    out = run_cli(
        "train",
        "--config",
        str(TINY_CONFIG),
        "--run-dir",
        str(tmp_path / "run"),
        "--dry-run",
        "--world-size",
        "4",
        launcher="in-process",
    ).stdout
    assert "world size 4" in out
    teacher = next(line for line in out.splitlines() if line.startswith("teacher"))
    student = next(line for line in out.splitlines() if line.startswith("student"))
    # The tiny preset as diffusers builds it from its config; the student is a copy of the teacher.
    from diffusers import SD3Transformer2DModel

    from ladd_ds.models.registry import PRESETS

    expected = sum(p.numel() for p in SD3Transformer2DModel.from_config(PRESETS["tiny"]).parameters())
    assert teacher.split()[1] == student.split()[1] == f"{expected:,}"
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
