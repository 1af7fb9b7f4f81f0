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
    for key in [k for k in env if k.startswith(("OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL", "SLURM_"))]:
        env.pop(key)  # a suite run under mpirun or srun: its ranks would take these for their own
    return env


def run_cli(
    *args: str, nproc: int = 1, timeout: int = 600, check: bool = True, launcher: str = "direct"
) -> subprocess.CompletedProcess:
    """`python -m ladd_ds ARGS` on `nproc` CPU ranks.

    Several ranks start either directly (`launcher="direct"`: one process per rank with the
    variables torchrun sets, the default) or under the deepspeed launcher (`"deepspeed"`). The
    deepspeed launcher runs two Python processes of its own that import torch and deepspeed before
    the ranks start (about 8 s per launch on 2 cores); the tests of the launcher itself (the
    2-rank reference run, tests/test_launchers.py) and of what it does when a rank dies
    (tests/test_faults.py) use it, every other multi-rank test starts its ranks directly.

    One process can also run in this one (`launcher="in-process"`): see `_run_in_process`."""
    if launcher == "in-process":
        assert nproc == 1, "in-process runs are jobs of one rank"
        return _run_in_process(args, check)
    if nproc > 1 and launcher == "direct":
        return _run_ranks(args, nproc, timeout, check)
    if nproc == 1:
        cmd = [sys.executable, "-m", "ladd_ds", *args]
    else:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", "ladd_ds", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _run_in_process(args: tuple[str, ...], check: bool) -> subprocess.CompletedProcess:
    """`ladd-ds ARGS` through the commands' entry point in the pytest process, as a job of one rank
    (the first run starts a gloo group of one, later ones join it), its printed output captured.
    Saves the ~8 s a subprocess spends importing torch, deepspeed and diffusers; for tests of
    what a run computes and writes, not of how a process starts, fails or is killed."""
    import contextlib
    import io

    from ladd_ds.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = main(list(args))
    proc = subprocess.CompletedProcess(["ladd-ds", *args], returncode, out.getvalue(), err.getvalue())
    if check and returncode != 0:
        raise AssertionError(f"ladd-ds {' '.join(args)} failed ({returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _run_ranks(
    args: tuple[str, ...], nproc: int, timeout: int, check: bool, module: str = "ladd_ds"
) -> subprocess.CompletedProcess:
    """`nproc` ranks of `python -m MODULE ARGS` on this host, as torchrun would start them. Like
    a launcher, the job fails when a rank fails: the others are killed. stdout and stderr are
    those of every rank, in rank order."""
    import tempfile
    import time

    cmd = [sys.executable, "-m", module, *args]
    port = str(free_port())
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for rank in range(nproc):
            env = subprocess_env()
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            out, err = open(Path(logs) / f"{rank}.out", "w+"), open(Path(logs) / f"{rank}.err", "w+")
            files.append((out, err))
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True))
        deadline, returncode = time.monotonic() + timeout, 0
        while any(p.poll() is None for p in procs) and not returncode:
            returncode = next((p.returncode for p in procs if p.returncode), 0)  # the first rank that failed
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.1)
        for p in procs:
            if returncode:
                p.kill()
            p.wait()
        returncode = returncode or next((p.returncode for p in procs if p.returncode), 0)
        stdout, stderr = "", ""
        for out, err in files:
            out.seek(0), err.seek(0)
            stdout, stderr = stdout + out.read(), stderr + err.read()
            out.close(), err.close()
    proc = subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    if check and returncode != 0:
        raise AssertionError(f"{nproc} ranks of {' '.join(cmd)} failed ({returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
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


def train_tiny(run_dir: Path, max_steps: int, sets: list[str], nproc: int = 1, check: bool = True, launcher: str = "direct"):
    """`ladd-ds train` of configs/tiny_cpu.yaml with `--set` overrides."""
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", str(max_steps)]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, nproc=nproc, check=check, launcher=launcher)


def export(run_dir: Path, out: Path, **kwargs) -> Path:
    """What `ladd-ds export --run RUN_DIR --out OUT [--step N] [--ema] --dtype fp32` runs, in this
    process (the command is a thin wrapper around `export_run`; test_multirank also runs the
    command itself). fp32 unless a test asks otherwise: the tests compare exports of runs with
    different layouts within fp32 round-off, which bf16's rounding would exceed."""
    from ladd_ds.export import export_run

    return export_run(run_dir, out, **{"dtype": "fp32", **kwargs})


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
        self.stderr: dict[int, str] = {}

    def __call__(self, nproc: int) -> Path:
        run_dir = self.root / f"{nproc}rank"
        if nproc not in self.stdout:
            sets = [*EXACT, *GLOBAL_BATCH_8[nproc], "checkpoint.every=1", f"checkpoint.keep_last={REFERENCE_STEPS}"]
            # The 2-rank run is the suite's training run under the deepspeed launcher.
            proc = train_tiny(run_dir, REFERENCE_STEPS, sets, nproc=nproc, launcher="deepspeed")
            self.stdout[nproc], self.stderr[nproc] = proc.stdout, proc.stderr
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


def mds_samples(folder) -> list[dict]:
    """Every sample of an MDS dataset folder, in order, decoded by streaming's shard readers. Not
    a StreamingDataset: each holds shared-memory blocks whose file descriptors stay open in the
    test process until the object is collected (hundreds over the suite ran out of descriptors)."""
    import numpy as np
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    folder = Path(folder)
    samples = []
    for shard in json.loads((folder / "index.json").read_text())["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        raw = folder / shard["raw_data"]["basename"]
        if raw.is_file():
            data = raw.read_bytes()
        else:  # only the compressed shard is there
            data = decompress(shard["compression"], (folder / shard["zip_data"]["basename"]).read_bytes())
        n = int(shard["samples"])
        offsets = np.frombuffer(data[4 : 4 + 4 * (n + 1)], np.uint32)  # MDS: sample count, then n + 1 offsets
        samples += [reader.decode_sample(data[offsets[i] : offsets[i + 1]]) for i in range(n)]
    return samples


@pytest.fixture(scope="session")
def tiny_ladd_run(tmp_path_factory) -> Path:
    """configs/tiny_cpu.yaml trained 2 steps in this process, a checkpoint after each: a finished
    LADD run for tests that read it and never change it (the README snippets, the bad-input table,
    which checks that it stays unchanged). ~8 s on 2 cores."""
    run_dir = tmp_path_factory.mktemp("tiny_ladd_run") / "run"
    train_tiny(run_dir, 2, ["logging.progress_bar=false", "checkpoint.every=1"], launcher="in-process")
    return run_dir


def hold(path, pid: int, host: str | None = None, age_s: float = 0.0, start_ticks="live") -> None:
    """Write the lock file of a holder `pid` on `host`, taken `age_s` seconds ago."""
    import time

    from ladd_ds.core.lock import _process_start_ticks

    ticks = _process_start_ticks(pid) if start_ticks == "live" else start_ticks
    record = {"host": host or socket.gethostname(), "pid": pid, "start_ticks": ticks, "time": time.time() - age_s}
    path.write_text(json.dumps({**record, "command": "ladd-ds train --config x.yaml", "token": "t"}))
