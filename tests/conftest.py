"""Shared helpers: tiny configs and running the `ladd-ds` command in a subprocess."""

from __future__ import annotations

import json
import os
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
