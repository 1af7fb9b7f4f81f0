"""Fault tolerance: non-finite steps are skipped on every rank, SIGKILL (also mid-checkpoint)
resumes exactly, and a vanished rank ends the job instead of hanging it."""

import os
import subprocess
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import (
    EXACT,
    GLOBAL_BATCH_8,
    REFERENCE_STEPS,
    TINY_CONFIG,
    export,
    free_port,
    read_metrics,
    run_cli,
    subprocess_env,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

FAST = ["--set", "logging.progress_bar=false"]
LOSSES = ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit")


def train_args(run_dir, max_steps, *sets):
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", str(max_steps), *FAST]
    for s in sets:
        args += ["--set", s]
    return args


def with_faults(spec):
    os.environ["LADD_DS_INJECT_FAULTS"] = spec


@pytest.fixture(autouse=True)
def clean_fault_env():
    yield
    os.environ.pop("LADD_DS_INJECT_FAULTS", None)


def exported(run_dir, step, out):
    export(run_dir, out, step=step)
    return (
        load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"),
        load_file(out / "discriminator" / "heads.safetensors"),
    )


def same(a, b):
    return all((a[k] == b[k]).all() for k in a)


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    with_faults("nan_loss@3:1")  # only rank 1 sees a NaN loss in step 3
    out = run_cli(*train_args(run_dir, 4, "checkpoint.every=1", "checkpoint.keep_last=10"), nproc=2)
    assert "step 3: non-finite loss or gradient norm, update skipped on every rank" in out.stdout
    records = {r["step"]: r for r in read_metrics(run_dir)}
    assert [records[s]["health/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    s2, h2 = exported(run_dir, 2, tmp_path / "e2")
    s3, h3 = exported(run_dir, 3, tmp_path / "e3")
    s4, h4 = exported(run_dir, 4, tmp_path / "e4")
    # Consolidated over both ranks' shards: neither rank moved its part of student or heads.
    assert same(s2, s3) and same(h2, h3)
    assert not same(s3, s4) and not same(h3, h4)  # training went on afterwards


def test_too_many_consecutive_skips_stop_with_a_checkpoint(tmp_path):
    with_faults("nan_loss@2,nan_loss@3")
    proc = run_cli(*train_args(tmp_path, 6, "health.max_consecutive_skips=2"), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 consecutive steps had a non-finite loss or gradient norm" in proc.stdout
    assert (tmp_path / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()


def test_sigkill_mid_run_and_mid_checkpoint_resume_exactly(tmp_path, reference_runs):
    reference = reference_runs(2)  # the same settings, uninterrupted
    sets = (*EXACT, *GLOBAL_BATCH_8[2], "checkpoint.every=2", "checkpoint.keep_last=5")
    crashed = tmp_path / "crashed"
    with_faults("kill@4:0")  # SIGKILL rank 0 before step 4: the launcher takes the job down
    killed = run_cli(*train_args(crashed, REFERENCE_STEPS, *sets), nproc=2, check=False, launcher="deepspeed")
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(crashed)] == [1, 2, 3]
    assert (crashed / ".ladd_ds.lock").is_file()  # left by the killed rank 0: a dead holder, taken over below
    with_faults("kill_in_save@4:1")  # rerun: resumes from step 2, dies while saving step 4
    killed = run_cli(*train_args(crashed, REFERENCE_STEPS, *sets), nproc=2, check=False, launcher="deepspeed")
    assert killed.returncode != 0
    ckpts = crashed / "checkpoints"
    assert (ckpts / ".step-00000004.tmp").is_dir() and not (ckpts / "step-00000004").exists()
    with_faults("")
    out = run_cli(*train_args(crashed, REFERENCE_STEPS, *sets), nproc=2)
    assert "resumed from" in out.stdout and "step-00000002 at step 2" in out.stdout

    got, want = read_metrics(crashed), read_metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # records past the checkpoint were replaced
    for g, w in zip(got, want):
        for key in LOSSES:
            assert g[key] == w[key], (g["step"], key)
    assert not (ckpts / ".step-00000004.tmp").exists()
    assert not (crashed / ".ladd_ds.lock").exists()  # released by the run that finished


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint_and_resumes_exactly(tmp_path, reference_runs):
    """SLURM's SIGTERM before a kill (here reaching rank 1 only, before step 3): every rank finishes
    step 3, they save it together and exit 143; the resumed run equals the uninterrupted one."""
    reference = reference_runs(2)
    sets = (*EXACT, *GLOBAL_BATCH_8[2], "checkpoint.every=100")  # no checkpoint but the signal's
    run_dir = tmp_path / "run"
    with_faults("sigterm@3:1")
    stopped = run_cli(*train_args(run_dir, REFERENCE_STEPS, *sets), nproc=2, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "ladd-ds train: stopped by SIGTERM after step 3; checkpoint" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000003"]
    assert not (run_dir / ".ladd_ds.lock").exists()
    with_faults("")
    out = run_cli(*train_args(run_dir, REFERENCE_STEPS, *sets), nproc=2)
    assert "step-00000003 at step 3" in out.stdout
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want):
        for key in LOSSES:
            assert g[key] == w[key], (g["step"], key)
    assert all(same(a, b) for a, b in zip(exported(run_dir, 6, tmp_path / "e1"), exported(reference, 6, tmp_path / "e2")))


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1 cannot write its part of the step-2 checkpoint: both ranks exit 2 with the line that
    names the checkpoint (none waits for a collective time-out), no partial checkpoint is left and
    step 1's resumes."""
    run_dir = tmp_path / "run"
    with_faults("enospc_in_save@2:1")
    proc = run_cli(*train_args(run_dir, 3, "checkpoint.every=1", "health.collective_timeout_s=120"), nproc=2, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = f"ladd-ds train: error: checkpoint {run_dir / 'checkpoints' / 'step-00000002'}: no space left on device"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]  # every rank
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001"]
    with_faults("")
    assert "at step 1" in run_cli(*train_args(run_dir, 2), nproc=2).stdout


def test_a_rank_that_exits_ends_the_job(tmp_path):
    launcher = os.path.join(os.path.dirname(os.sys.executable), "deepspeed")
    args = train_args(tmp_path, 6, "health.collective_timeout_s=20")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ladd_ds", *args]
    env = subprocess_env()
    env["LADD_DS_INJECT_FAULTS"] = "exit@3:1"  # rank 1 leaves quietly (exit code 0) before step 3
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert elapsed < 240
    assert "done: step 6" not in proc.stdout
