"""Rank discovery for processes that a launcher started without RANK (mpirun, an MPICH/Intel MPI
launcher, srun), and the network variables a multi-node run depends on. Pure functions of an
environment mapping: engines.init_distributed applies them to os.environ."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ladd_ds.core.errors import InputError

# MPI launchers, in the order they are trusted: (name, world size, rank, local rank, ranks per node).
# They come before Slurm's variables: mpirun inside a Slurm allocation starts its daemons with srun,
# so its ranks inherit a step's SLURM_* variables that describe the daemons, not the ranks.
_MPI_LAUNCHERS = (
    ("OpenMPI's mpirun", *(f"OMPI_COMM_WORLD_{k}" for k in ("SIZE", "RANK", "LOCAL_RANK", "LOCAL_SIZE"))),
    ("an MPICH/Intel MPI launcher (PMI)", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
DEFAULT_MASTER_PORT = "29500"  # the launchers' default (and torchrun's)


def launcher_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous needs (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that `env` lacks, derived from the launcher that
    started this process; `env` itself is not changed.

    - RANK set (torchrun, the deepspeed launcher): nothing to add.
    - Started by mpirun (OMPI_COMM_WORLD_*), an MPICH/Intel MPI launcher (PMI_RANK/PMI_SIZE,
      MPI_LOCALRANKID/MPI_LOCALNRANKS) or as one of several srun tasks (SLURM_PROCID,
      SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE): that launcher's rank, world
      size and local rank. MASTER_ADDR is the environment's, else 127.0.0.1 when every rank is on
      this node, else the first host of SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; MASTER_PORT the
      environment's or 29500.
    - None of these: a world of one (a plain `python -m ladd_ds ...`). MASTER_PORT is left to the
      caller (any free port).

    Raises InputError, naming the variables, when a launcher's variables are incomplete or
    contradict each other, when WORLD_SIZE > 1 comes without RANK, or when rank 0's host cannot
    be told: N copies of a one-rank job must never run side by side into the same run directory.
    """
    if "RANK" in env:
        return {}
    found = [_mpi_ranks(env, launcher) for launcher in _MPI_LAUNCHERS if launcher[1] in env]
    if len(found) > 1 and found[0][1:] != found[1][1:]:
        raise InputError(
            f"this process was started by {found[0][0]} and by {found[1][0]} and they disagree "
            f"on its rank or world size ({_describe(found[0][1:])} vs {_describe(found[1][1:])}): "
            "unset the other launcher's variables, or set RANK, WORLD_SIZE, LOCAL_RANK, "
            "LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself"
        )
    if not found and ("SLURM_STEP_NUM_TASKS" in env or _int(env, "SLURM_NTASKS", 1) > 1):
        found = [_slurm_ranks(env)]
    if not found:
        if _int(env, "WORLD_SIZE", 1) > 1:
            raise InputError(
                f"WORLD_SIZE={env['WORLD_SIZE']} but RANK is not set: start the ranks with a "
                "launcher (deepspeed, torchrun, srun, mpirun) or set RANK, LOCAL_RANK and "
                "LOCAL_WORLD_SIZE for every rank"
            )
        found = [("", 0, 1, 0, 1)]
    name, rank, world, local_rank, local_world = found[0]
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world)}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = _master_addr(env, name, world, local_world)
    if world > 1 and "MASTER_PORT" not in env:
        out["MASTER_PORT"] = DEFAULT_MASTER_PORT
    return out


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in env and default is not None:
        return default
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise InputError(f"environment variable {key} is {env.get(key, 'not set')!r}; expected an integer") from None


def _describe(values: tuple[int, int, int, int]) -> str:
    return "rank {}, world size {}, local rank {}, ranks per node {}".format(*values)


def _check(name: str, keys: tuple[str, ...], rank: int, world: int, local_rank: int, local_world: int):
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise InputError(
            f"the variables of {name} ({', '.join(keys)}) give {_describe((rank, world, local_rank, local_world))}, "
            "which is not a valid rank: check how the job was started"
        )
    return name, rank, world, local_rank, local_world


def _mpi_ranks(env: Mapping[str, str], launcher: tuple[str, ...]):
    name, size_key, rank_key, local_rank_key, local_size_key = launcher
    missing = [k for k in (rank_key, local_rank_key, local_size_key) if k not in env]
    if missing:
        raise InputError(
            f"{size_key}={env[size_key]} says {name} started this process, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: set RANK, WORLD_SIZE, LOCAL_RANK and "
            "LOCAL_WORLD_SIZE for every rank, or start the ranks with torchrun or the deepspeed launcher"
        )
    keys = (size_key, rank_key, local_rank_key, local_size_key)
    return _check(name, keys, _int(env, rank_key), _int(env, size_key), _int(env, local_rank_key), _int(env, local_size_key))


def _slurm_ranks(env: Mapping[str, str]):
    name = "srun"
    if "SLURM_STEP_NUM_TASKS" not in env:
        raise InputError(
            f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is not an srun task "
            "(SLURM_STEP_NUM_TASKS is not set): start the ranks with srun (launchers/slurm.sbatch), "
            "or unset SLURM_NTASKS for a run of one process"
        )
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if missing:
        raise InputError(f"SLURM_STEP_NUM_TASKS is set but {', '.join(missing)} is not: this is not an srun task's environment")
    local_world = _slurm_tasks_on_this_node(env)
    keys = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE")
    rank, world, local_rank = (_int(env, k) for k in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
    return _check(name, keys, rank, world, local_rank, local_world)


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE lists them per node of the step
    in Slurm's compressed form ("4(x2),2": 4, 4, 2), indexed by SLURM_NODEID; a fixed
    SLURM_NTASKS_PER_NODE is the fallback."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            counts = []
            break
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID", 0)
    if node < len(counts):
        return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    raise InputError(
        f"cannot tell how many srun tasks run on this node: SLURM_STEP_TASKS_PER_NODE is {spec!r} "
        f"and SLURM_NODEID {env.get('SLURM_NODEID', 'not set')!r}; set LOCAL_WORLD_SIZE or pass "
        "srun --ntasks-per-node"
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: "gpu-[03-05,09],cpu01" -> "gpu-03" (each bracket
    contributes its first number, zero padding kept; "rack[1-2]-n[01-04]" -> "rack1-n01")."""
    head = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", head)


def _master_addr(env: Mapping[str, str], name: str, world: int, local_world: int) -> str:
    if local_world == world:  # every rank is on this node, rank 0 too
        return "127.0.0.1"
    keys = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if name == "srun" else ("SLURM_JOB_NODELIST",)
    for key in keys:
        host = first_slurm_host(env.get(key, ""))
        if host:
            return host
    raise InputError(
        f"{name} started {world} ranks on several nodes but MASTER_ADDR is not set and there is no "
        "SLURM_JOB_NODELIST to take rank 0's host from: export MASTER_ADDR (rank 0's host, reachable "
        "from every node) and MASTER_PORT to every rank, e.g. mpirun -x MASTER_ADDR=node-01 -x MASTER_PORT=29500"
    )


NETWORK_VARIABLE_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "TORCH_DISTRIBUTED_DEBUG")


def network_env(env: Mapping[str, str]) -> dict[str, str]:
    """The NCCL/gloo variables set in `env` (logged at start: a multi-node run that hangs or is slow
    usually has the wrong interface or HCA here)."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(NETWORK_VARIABLE_PREFIXES)}
