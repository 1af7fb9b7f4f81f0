"""The launch scripts start 2 CPU ranks on this machine: the single-node script trains a step;
the multi-node and Slurm scripts, whose training path is the same command, start both ranks with
`--dry-run` (each rank reports the world it was started in, without building engines)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, read_metrics, subprocess_env

pytestmark = [pytest.mark.multiproc]


def launch(script, run_dir, env_extra, tmp_path, train: bool = False):
    env = subprocess_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(env_extra)
    cmd = [str(REPO / "launchers" / script), "configs/tiny_cpu.yaml", "--run-dir", str(run_dir), "--max-steps", "1"]
    cmd += ["--set", "logging.progress_bar=false"] + ([] if train else ["--dry-run"])
    proc = subprocess.run(
        cmd, cwd=tmp_path if script == "multi_node.sh" else REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if train:
        assert "world size 2, 2 ranks per node" in proc.stdout
        assert [r["step"] for r in read_metrics(run_dir)] == [1]
    else:  # both ranks started, in one world of 2
        assert proc.stdout.count("; world size 2") == 2, proc.stdout[-3000:]
    return proc


def test_single_node_script(tmp_path):
    launch("single_node.sh", tmp_path / "run", {"NUM_GPUS": "2", "MASTER_PORT": str(free_port())}, tmp_path, train=True)


def test_multi_node_script_with_a_one_host_hostfile(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=2\n")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the script runs from its working directory
    env = {
        "HOSTFILE": str(hostfile),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "LAUNCHER_ARGS": "--no_ssh_check",  # one host: launch locally instead of over ssh
        "PASS_ENV": "LADD_DS_TEST_MARK",
        "LADD_DS_TEST_MARK": "1",
    }
    launch("multi_node.sh", tmp_path / "run", env, tmp_path)
    forwarded = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert "LADD_DS_TEST_MARK=1" in forwarded and "OMP_NUM_THREADS=1" in forwarded


def test_slurm_node_script_with_torchrun(tmp_path):
    env = {
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "GPUS_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "VENV": str(Path(sys.executable).parent.parent),
    }
    launch("slurm_node.sh", tmp_path / "run", env, tmp_path)
