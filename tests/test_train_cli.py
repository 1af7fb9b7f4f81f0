"""End to end through the `ladd-ds train` command: logs, checkpoints, exact resume, 2 ranks."""

import json

import pytest
import torch

from tests.conftest import TINY_CONFIG, read_metrics, run_cli

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
