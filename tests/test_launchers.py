"""The launch scripts start 2 CPU ranks on this machine: the single-node script trains a step;
the multi-node and Slurm node scripts, whose training path is the same command, start both ranks
with `--dry-run` (each rank reports the world it was started in, without building engines). The
Slurm batch script runs as Slurm runs it (a copy in a spool directory) with fake `srun` and
`scontrol` that start its two "nodes" here; the openmpi variant of the multi-node script runs
DeepSpeed's real launcher up to a fake `mpirun`. Ranks started without RANK (mpirun, srun, PMI)
take their rank from the launcher's variables (unit tests: tests/test_launcher_env.py)."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
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


def fake_commands(tmp_path, **scripts: str) -> dict:
    """The test's environment with executable `scripts` (name -> bash body) first on PATH."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])
    return env


# `scontrol show hostnames LIST`: every simulated node is this machine.
FAKE_SCONTROL = '[ "$1 $2" = "show hostnames" ] || exit 1\nfor _ in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done\n'

# `srun [--options] COMMAND...`: one task per simulated node, with the variables srun sets, here.
# Each node's task runs with a /dev/shm and a TMPDIR of its own, as on separate machines
# (mosaicml-streaming's local leaders of both "nodes" would otherwise collide on
# /000000_locals): FAKE_SRUN_NODE is the command that gives it one (see private_shm_command).
# With FAKE_SRUN_ARGS set it only writes its arguments there.
FAKE_SRUN = r"""
if [ -n "${FAKE_SRUN_ARGS:-}" ]; then printf '%s\n' "$@" > "$FAKE_SRUN_ARGS"; exit 0; fi
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  mkdir -p "$FAKE_SRUN_TMP/node$node"
  TMPDIR=$FAKE_SRUN_TMP/node$node SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 \
    SLURM_NTASKS=$SLURM_NNODES SLURM_STEP_NUM_TASKS=$SLURM_NNODES SLURM_STEP_TASKS_PER_NODE="1(x$SLURM_NNODES)" \
    $FAKE_SRUN_NODE sh -c 'mount -t tmpfs tmpfs /dev/shm && exec "$@"' node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def private_shm_command() -> str:
    """A command prefix that runs its command in a mount namespace of its own (where it may mount
    a /dev/shm), or skip: two nodes simulated on one host must not share one."""
    for prefix in ("unshare --mount", "unshare --mount --map-root-user"):
        probe = subprocess.run([*prefix.split(), "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("simulating 2 nodes on one host needs a private /dev/shm per node (unshare --mount)")


def spooled_batch_script(tmp_path) -> Path:
    """launchers/slurm.sbatch copied where slurmd runs it from (its spool directory)."""
    spool = tmp_path / "var" / "spool" / "slurmd" / "job00042"
    spool.mkdir(parents=True)
    return Path(shutil.copy(REPO / "launchers" / "slurm.sbatch", spool / "slurm_script"))


def slurm_job_env(tmp_path, submit_dir: Path) -> dict:
    """The batch script's environment in a job of 2 nodes, 1 task per node."""
    env = fake_commands(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    env.update(
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST="node-[1-2]",
        SLURM_NNODES="2",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_SUBMIT_DIR=str(submit_dir),
        GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()),
        VENV=str(Path(sys.executable).parent.parent),
    )
    return env


def test_slurm_batch_script_trains_two_nodes_from_the_spool_directory(tmp_path):
    script, run_dir = spooled_batch_script(tmp_path), tmp_path / "run"
    env = slurm_job_env(tmp_path, REPO)
    env.update(FAKE_SRUN_NODE=private_shm_command(), FAKE_SRUN_TMP=str(tmp_path / "node_tmp"))
    env.update(GLOO_SOCKET_IFNAME="lo", NCCL_DEBUG="WARN")  # must reach the ranks unchanged
    cmd = ["bash", str(script), "configs/tiny_cpu.yaml", "--run-dir", str(run_dir), "--max-steps", "2"]
    proc = subprocess.run(
        cmd + ["--set", "logging.progress_bar=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2, 1 ranks per node" in proc.stdout, proc.stdout[-3000:]
    assert "network: GLOO_SOCKET_IFNAME=lo NCCL_DEBUG=WARN" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_slurm_batch_script_finds_the_checkout_from_LADD_DS_HOME_or_says_how(tmp_path):
    script, submit_dir = spooled_batch_script(tmp_path), tmp_path / "elsewhere"
    submit_dir.mkdir()
    env = slurm_job_env(tmp_path, submit_dir)
    env["FAKE_SRUN_ARGS"] = str(tmp_path / "srun_args")
    cmd = ["bash", str(script), "configs/tiny_cpu.yaml"]
    proc = subprocess.run(cmd, cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "launchers/slurm_node.sh not found" in proc.stderr and "LADD_DS_HOME" in proc.stderr
    proc = subprocess.run(cmd, cwd=submit_dir, env={**env, "LADD_DS_HOME": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun_args = (tmp_path / "srun_args").read_text().splitlines()
    assert srun_args[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert Path(srun_args[3]).resolve() == REPO / "launchers" / "slurm_node.sh" and srun_args[4] == "configs/tiny_cpu.yaml"


# `mpirun ARGS`: writes its arguments to FAKE_MPIRUN_ARGS instead of starting anything.
FAKE_MPIRUN = 'printf \'%s\\n\' "$@" > "$FAKE_MPIRUN_ARGS"\n'


def test_multi_node_script_with_the_openmpi_launcher(tmp_path):
    """DeepSpeed's real launcher takes the script's command line (its openmpi backend raises on
    --num_nodes/--num_gpus) and runs mpirun with MASTER_ADDR/MASTER_PORT exported to every rank."""
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node-01 slots=2\nnode-02 slots=2\n")
    env = fake_commands(tmp_path, mpirun=FAKE_MPIRUN, ompi_info="exit 0\n")
    env.update(
        HOSTFILE=str(hostfile),
        LAUNCHER_ARGS="--launcher openmpi --no_ssh_check",
        MPIRUN_ARGS="--mca btl_tcp_if_include ib0",
        NCCL_SOCKET_IFNAME="ib0",
        FAKE_MPIRUN_ARGS=str(tmp_path / "mpirun_args"),
    )
    script = [str(REPO / "launchers" / "multi_node.sh"), "configs/tiny_cpu.yaml", "--max-steps", "1"]
    proc = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mpirun = " ".join((tmp_path / "mpirun_args").read_text().splitlines())
    assert mpirun.startswith(f"-n 4 -hostfile {hostfile} ")  # every slot of both hosts
    assert "--mca btl_tcp_if_include ib0" in mpirun and "eth0" not in mpirun
    for export in ("MASTER_ADDR=node-01", "MASTER_PORT=29500", "NCCL_SOCKET_IFNAME=ib0"):
        assert f"-x {export}" in mpirun
    assert mpirun.endswith("-m ladd_ds train --config configs/tiny_cpu.yaml --max-steps 1")

    # an MPI launcher cannot limit nodes or ranks per node: refused before anything starts
    proc = subprocess.run(script, cwd=tmp_path, env={**env, "NUM_NODES": "1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unset NUM_NODES and NUM_GPUS" in proc.stderr


def start_processes(cmd: list[str], envs: list[dict], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """One process of `cmd` per environment, side by side, as an MPI launcher starts them."""
    with tempfile.TemporaryDirectory() as logs:
        outs = [open(Path(logs) / f"{i}.out", "w+") for i in range(len(envs))]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT) for env, out in zip(envs, outs)]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in procs:
            p.kill()
            p.wait()
        results = []
        for p, out in zip(procs, outs):
            out.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), ""))
            out.close()
    return results


def test_ranks_started_by_mpirun_without_RANK_form_one_world(tmp_path):
    """Two processes with only OpenMPI's variables (no RANK, no MASTER_ADDR: one node) train
    as the ranks of one world of 2, not as two worlds of one."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ladd_ds", "train", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(run_dir)]
    cmd += ["--max-steps", "1", "--set", "logging.progress_bar=false"]
    port, envs = str(free_port()), []
    for rank in range(2):
        env = subprocess_env()
        env.update(MASTER_PORT=port, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_SIZE="2")
        env.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK=str(rank))
        envs.append(env)
    ranks = start_processes(cmd, envs)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stdout[-3000:] + ranks[1].stdout[-3000:]
    assert "world size 2, 2 ranks per node" in ranks[0].stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def test_a_rank_whose_launcher_is_incomplete_stops_with_the_variables_named(tmp_path):
    """mpirun over 2 nodes without MASTER_ADDR: a one-line error, not a world of one."""
    env = subprocess_env()
    env.update(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    cmd = [sys.executable, "-m", "ladd_ds", "train", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ladd-ds train: error: OpenMPI's mpirun started 4 ranks on several nodes but MASTER_ADDR is not set")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
