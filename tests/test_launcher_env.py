"""Rank discovery for processes started without RANK (ladd_ds/distributed/launch_env.py): mpirun,
an MPICH/Intel MPI launcher and srun give each process its rank, and what cannot be told is an
error that names the variables, never a silent world of one. The subprocess tests are in
tests/test_launchers.py."""

import pytest

from ladd_ds.core.errors import InputError
from ladd_ds.distributed.launch_env import first_slurm_host, launcher_env, network_env


def ompi(rank: int, world: int, local_rank: int, local_world: int) -> dict:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(world),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_world),
    }


def srun_task(rank: int, tasks: int, node: int, local_rank: int, tasks_per_node: str) -> dict:
    """An srun task's variables, as srun sets them (SLURM_NTASKS too, like the batch script's)."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_NODEID": str(node),
        "SLURM_LOCALID": str(local_rank),
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_STEP_NODELIST": "gpu-[07-09]",
        "SLURM_JOB_NODELIST": "gpu-[07-09]",
    }


def ranks(update: dict) -> tuple[int, int, int, int]:
    return tuple(int(update[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def test_no_launcher_is_a_world_of_one():
    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert launcher_env({}) == one
    # MASTER_PORT is left to the caller (any free port); the environment's MASTER_ADDR is kept
    assert "MASTER_ADDR" not in launcher_env({"MASTER_ADDR": "10.0.0.1"})
    # one srun task, or the batch script itself with one task: still a world of one
    assert ranks(launcher_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})) == (0, 1, 0, 1)
    assert ranks(launcher_env(srun_task(0, 1, 0, 0, "1"))) == (0, 1, 0, 1)


def test_rank_set_by_torchrun_or_deepspeed_wins():
    # torchrun under `srun --ntasks-per-node=1` (launchers/slurm.sbatch): SLURM_NTASKS > 1 is set
    # in its workers too, but they have RANK, so nothing changes
    env = {"RANK": "3", "WORLD_SIZE": "16", **srun_task(1, 2, 1, 0, "1(x2)")}
    assert launcher_env(env) == {}


def test_openmpi_ranks():
    env = {**ompi(5, 8, 1, 4), "MASTER_ADDR": "node-01"}
    expected = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"}
    assert launcher_env(env) == expected


def test_openmpi_on_one_node_needs_no_master_addr():
    update = launcher_env({**ompi(1, 2, 1, 2), "MASTER_PORT": "1234"})
    assert ranks(update) == (1, 2, 1, 2) and update["MASTER_ADDR"] == "127.0.0.1" and "MASTER_PORT" not in update


def test_openmpi_on_several_nodes_takes_master_addr_from_the_slurm_allocation():
    update = launcher_env({**ompi(2, 4, 0, 2), "SLURM_JOB_NODELIST": "a-[3-4]"})
    assert update["MASTER_ADDR"] == "a-3"


def test_mpi_variables_win_over_the_slurm_step_of_mpiruns_daemons():
    # mpirun inside an allocation starts its daemons with srun: the ranks inherit a step of one
    # task per node whose SLURM_PROCID is the node's, not the rank's
    env = {**ompi(3, 4, 1, 2), **srun_task(1, 2, 1, 0, "1(x2)"), "MASTER_ADDR": "gpu-07"}
    assert ranks(launcher_env(env)) == (3, 4, 1, 2)


def test_pmi_ranks():
    env = {"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4", "MASTER_ADDR": "n1"}
    assert ranks(launcher_env(env)) == (6, 8, 2, 4)


def test_srun_tasks_with_uneven_nodes():
    # 10 tasks as 4, 4, 2 on gpu-07..09: the task of rank 9 is the second of the third node
    update = launcher_env(srun_task(9, 10, 2, 1, "4(x2),2"))
    assert ranks(update) == (9, 10, 1, 2)
    assert update["MASTER_ADDR"] == "gpu-07" and update["MASTER_PORT"] == "29500"
    # a fixed --ntasks-per-node when the step's list is absent
    env = srun_task(5, 8, 1, 1, "")
    assert ranks(launcher_env({**env, "SLURM_NTASKS_PER_NODE": "4"})) == (5, 8, 1, 4)


@pytest.mark.parametrize(
    "env, names",
    [
        # an incomplete launcher environment
        (
            {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"},
            ["OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"],
        ),
        ({"PMI_SIZE": "4", "PMI_RANK": "1"}, ["MPI_LOCALRANKID", "MPI_LOCALNRANKS"]),
        # two MPI launchers that disagree
        (
            {**ompi(1, 2, 1, 2), "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"},
            ["OpenMPI", "PMI", "disagree"],
        ),
        # several nodes and no way to tell rank 0's host
        (ompi(2, 4, 0, 2), ["MASTER_ADDR"]),
        # SLURM_NTASKS > 1 in a process that is not an srun task (the batch script itself)
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, ["SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "srun"]),
        # an srun step whose tasks per node cannot be read
        ({**srun_task(1, 2, 1, 0, ""), "SLURM_STEP_TASKS_PER_NODE": "?"}, ["SLURM_STEP_TASKS_PER_NODE"]),
        # values that are not a rank
        (ompi(2, 2, 0, 2), ["OMPI_COMM_WORLD_RANK"]),
        ({**ompi(0, 2, 0, 2), "OMPI_COMM_WORLD_RANK": "x"}, ["OMPI_COMM_WORLD_RANK"]),
        # WORLD_SIZE without RANK
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
    ],
)
def test_what_cannot_be_told_is_an_error_naming_the_variables(env, names):
    with pytest.raises(InputError) as e:
        launcher_env(env)
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu-[03-05,09],cpu01", "gpu-03"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("node7", "node7"),
        ("a[7]", "a7"),
        ("10.0.0.5,10.0.0.6", "10.0.0.5"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_network_env_lists_the_nccl_and_gloo_variables():
    env = {"NCCL_SOCKET_IFNAME": "ib0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "GLOO_SOCKET_IFNAME": "ib0", "HOME": "/root"}
    assert list(network_env(env)) == ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"]
