"""Shared helpers: tiny configs and running the `ladd-ds` command in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores; more threads only oversubscribe
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def run_cli(*args: str, nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m ladd_ds ARGS`, or under the deepspeed launcher with `nproc` CPU ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "ladd_ds", *args]
    else:
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", "ladd_ds", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def cli_error(capsys, *args: str) -> str:
    """`ladd-ds ARGS` in this process, on input it must refuse: exit code 2 and a one-line message
    on stderr, no traceback (the CLI turns only the project's user-facing errors into that; a bug
    raises here). Returns stderr. In-process because these errors come before any engine or
    process group is started, and a subprocess would spend most of its time importing."""
    from ladd_ds.cli import main

    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # libraries may warn before it
    assert last.startswith(f"ladd-ds {args[0]}: error: ") and "Traceback" not in err, err
    return err


def train_tiny(run_dir: Path, max_steps: int, sets: list[str], nproc: int = 1, check: bool = True):
    """`ladd-ds train` of configs/tiny_cpu.yaml with `--set` overrides."""
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", str(max_steps)]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, nproc=nproc, check=check)


def export(run_dir: Path, out: Path, **kwargs) -> Path:
    """What `ladd-ds export --run RUN_DIR --out OUT [--step N] [--ema]` runs, in this process (the
    command is a thin wrapper around `export_run`; test_multirank also runs the command itself)."""
    from ladd_ds.export import export_run

    return export_run(run_dir, out, **kwargs)


# Settings under which runs of different layouts are compared within fp32 round-off. A large Adam
# eps keeps updates proportional to the gradient; with the default eps, Adam's first steps move
# every weight by ~lr * sign(grad) and turn round-off in near-zero gradients into lr-sized
# differences. No warm-up, so the LR does not depend on max_steps either.
EXACT = [
    "logging.progress_bar=false",
    "optim.eps=0.01",
    "optim.student_lr=1.0e-2",
    "optim.heads_lr=1.0e-2",
    "optim.warmup_steps=0",
]
# One global batch of 8 for every world size: the runs see the same samples.
GLOBAL_BATCH_8 = {1: ["data.micro_batch_size=8"], 2: ["data.micro_batch_size=4"], 4: ["data.micro_batch_size=2"]}
REFERENCE_STEPS = 6


class ReferenceRuns:
    """The tiny config trained REFERENCE_STEPS steps with EXACT settings and a global batch of 8,
    a checkpoint after every step: one run per world size, trained on first use and shared by the
    multi-rank, world-size-resume and fault tests (the same 6-step runs were trained in each)."""

    def __init__(self, root: Path):
        self.root = root
        self.stdout: dict[int, str] = {}

    def __call__(self, nproc: int) -> Path:
        run_dir = self.root / f"{nproc}rank"
        if nproc not in self.stdout:
            sets = [*EXACT, *GLOBAL_BATCH_8[nproc], "checkpoint.every=1", f"checkpoint.keep_last={REFERENCE_STEPS}"]
            self.stdout[nproc] = train_tiny(run_dir, REFERENCE_STEPS, sets, nproc=nproc).stdout
        return run_dir


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory) -> ReferenceRuns:
    return ReferenceRuns(tmp_path_factory.mktemp("reference_runs"))


def copy_run_until(src: Path, dst: Path, step: int) -> Path:
    """A copy of run directory `src` as it was after its checkpoint at `step`: later checkpoints
    are dropped (the resumed run replaces the later metrics records itself). Saves training the
    first part of a resume test again."""
    shutil.copytree(src, dst)
    for checkpoint in (dst / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    return dst


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def distributed_world_of_one():
    """Initialise a one-rank gloo process group in this pytest process (once)."""
    from ladd_ds.distributed import engines

    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    engines.init_distributed("gloo")
    yield


@pytest.fixture(scope="session")
def small_demo_teacher(tmp_path_factory) -> Path:
    """A demo-architecture teacher folder after 2 pretraining steps (shared by the sampling, pairs
    and LoRA tests: what they check does not need a trained teacher)."""
    from ladd_ds.demo.pretrain import PretrainSettings, pretrain_teacher

    return pretrain_teacher(tmp_path_factory.mktemp("teacher") / "teacher", PretrainSettings(steps=2, batch_size=4))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
