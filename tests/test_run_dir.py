"""One writer per run directory and data root (ladd_ds/core/lock.py), and a resume that checks what
changed (ladd_ds/training/run_dir.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from ladd_ds.core.lock import FileLock, LockedError
from tests.conftest import REPO, TINY_CONFIG, cli_error, hold, run_cli, subprocess_env, train_tiny
from tests.test_outputs import checksums

FAST = ["logging.progress_bar=false", "logging.tensorboard=false"]
LOCK = ".ladd_ds.lock"


@pytest.fixture
def other_process():
    """A live process that is not this one (a lock's holder)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path, other_process):
    lock = tmp_path / LOCK
    hold(lock, other_process.pid)
    with pytest.raises(LockedError, match=f"pid {other_process.pid} on host {socket.gethostname()}.*ladd-ds train"):
        FileLock(lock, "run directory X").acquire()
    other_process.kill()
    other_process.wait()
    with FileLock(lock, "run directory X") as taken:  # its holder is gone
        assert json.loads(lock.read_text())["pid"] == os.getpid() and taken.held
    assert not lock.exists()  # released


def test_a_reused_pid_and_another_hosts_lock(tmp_path, other_process):
    lock = tmp_path / LOCK
    hold(lock, other_process.pid, start_ticks=1)  # that pid now belongs to a later process
    FileLock(lock, "run directory X").acquire().release()
    hold(lock, 1, host="node-elsewhere", age_s=3 * 3600)  # cannot be checked from here
    with pytest.raises(LockedError, match=r"host node-elsewhere, started .* \(3\.0 h ago\).*another host.*delete"):
        FileLock(lock, "run directory X").acquire()


def test_train_and_synth_refuse_a_held_place_on_one_and_two_ranks(tmp_path, other_process, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hold(run_dir / LOCK, other_process.pid)
    before = checksums(run_dir)
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "1"]
    assert f"in use by another ladd-ds process: pid {other_process.pid}" in cli_error(capsys, *args)
    proc = run_cli(*args, nproc=2, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"ladd-ds train: error: run directory {run_dir} is in use") == 2  # every rank says it
    assert checksums(run_dir) == before
    data = tmp_path / "data"
    data.mkdir()
    hold(data / LOCK, other_process.pid)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 3\n")
    err = cli_error(capsys, "synth", "--config", str(TINY_CONFIG), "--prompts", str(prompts), "--out", str(data))
    assert f"dataset {data} is in use" in err


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_jobs_started_together_on_one_run_directory(tmp_path):
    """Exactly one of two `ladd-ds train` started at once runs; the other exits 2 naming it."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "3"]
    for s in FAST:
        args += ["--set", s]
    cmd = [sys.executable, "-m", "ladd_ds", *args]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    winner = next(p for p, r in zip(procs, results) if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    assert f"is in use by another ladd-ds process: pid {winner.pid}" in loser[2]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one writer
    assert not (run_dir / LOCK).exists()


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    train_tiny(run_dir, 1, FAST, launcher="in-process")
    return run_dir


def resume(run_dir, *sets, allow=None):
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "2"]
    for s in [*FAST, *sets]:
        args += ["--set", s]
    return args + (["--allow-change", allow] if allow else [])


def test_a_resume_that_changes_what_is_trained_is_refused_with_the_differences(one_step_run, capsys):
    before = checksums(one_step_run)
    err = cli_error(capsys, *resume(one_step_run, "optim.student_lr=2.0e-4", "discriminator.hidden_channels=64"))
    assert "resumes at step 1" in err
    assert "discriminator.hidden_channels: 32 -> 64; optim.student_lr: 0.0001 -> 0.0002" in err
    assert "--allow-change discriminator.hidden_channels,optim.student_lr" in err
    err = cli_error(capsys, *resume(one_step_run, "data.micro_batch_size=2"))  # same world size: a smaller global batch
    assert "data.micro_batch_size: 4 (global batch 4 on 1 ranks) -> 2 (global batch 2 on 1 ranks)" in err
    assert checksums(one_step_run) == before  # nothing written, the lock released


def test_convert_checkpoint_refuses_a_run_directory_in_use(one_step_run, other_process, capsys):
    hold(one_step_run / LOCK, other_process.pid)
    try:
        err = cli_error(capsys, "convert-checkpoint", "--run", str(one_step_run))
        assert f"is in use by another ladd-ds process: pid {other_process.pid}" in err
    finally:
        (one_step_run / LOCK).unlink()


def test_dpo_refuses_a_ladd_run_directory_by_name(one_step_run, capsys):
    err = cli_error(capsys, "dpo", "--config", str(REPO / "configs" / "tiny_dpo_cpu.yaml"), "--run-dir", str(one_step_run))
    assert "is a run directory of ladd-ds train (LADD); ladd-ds dpo (Diffusion-DPO) cannot continue it" in err


def test_allowed_changes_are_recorded_and_config_yaml_keeps_the_original(one_step_run, tmp_path):
    from ladd_ds.training.export import run_checkpoint

    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(one_step_run, run_dir, symlinks=True)
    original = (run_dir / "config.yaml").read_text()
    run_cli(*resume(run_dir, "optim.student_lr=2.0e-4", "logging.every=2", allow="optim"), launcher="in-process")
    assert (run_dir / "config.yaml").read_text() == original
    assert yaml.safe_load(original)["optim"]["student_lr"] == 1.0e-4
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["world_size"]) for h in history] == [(0, 1), (1, 1)]
    assert history[1]["changed"]["optim.student_lr"] == [1.0e-4, 2.0e-4]
    assert history[1]["changed"]["logging.every"] == [1, 2]  # free keys are recorded too
    assert run_checkpoint(run_dir, None)[0].optim.student_lr == 2.0e-4  # exports see the config it trained with
    # Once accepted, the change is the run's config: the next resume with it needs no flag.
    run_cli(*resume(run_dir, "optim.student_lr=2.0e-4", "logging.every=2"), "--max-steps", "3", launcher="in-process")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, precision):
    """SIGINT before step 2 of a one-rank run: step 2 is finished and saved, exit 130, one line;
    the same command resumes from it (SIGTERM on 2 ranks: tests/test_faults.py)."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("LADD_DS_INJECT_FAULTS", "sigint@2")
    sets = [*FAST, f"deepspeed.precision={precision}", "checkpoint.every=100"]
    proc = train_tiny(run_dir, 3, sets, check=False, launcher="in-process")
    assert proc.returncode == 130
    assert "ladd-ds train: stopped by SIGINT after step 2; checkpoint" in proc.stdout
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]
    monkeypatch.delenv("LADD_DS_INJECT_FAULTS")
    out = train_tiny(run_dir, 3, sets, launcher="in-process")
    assert "at step 2" in out.stdout and "done: step 3" in out.stdout
