"""Rank helpers that are safe to call before (or without) torch.distributed initialisation."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """Ranks on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))


def export_local_world_size() -> None:
    """Set LOCAL_WORLD_SIZE from the deepspeed launcher's LOCAL_SIZE: streaming reads it to find
    the ranks sharing a node; without it every rank thinks it is a local leader and they collide
    on shared memory (FileExistsError: '/000000_locals')."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0; the line also goes to the run's log file while a run has one open
    (ladd_ds.training.logfile attaches it to the "ladd_ds" logger)."""
    if is_main():
        print(*args, **kwargs, flush=True)
        logging.getLogger("ladd_ds").info(kwargs.get("sep", " ").join(map(str, args)))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def prepare_launcher_env() -> None:
    """Environment fixes needed under the deepspeed launcher, before any dataset is created.

    The launcher exports LOCAL_SIZE but mosaicml-streaming reads LOCAL_WORLD_SIZE; without it
    ranks of one node collide on shared memory (FileExistsError: '/000000_locals').
    """
    if "LOCAL_SIZE" in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; make the CPU choice explicit.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of scalar metrics over ranks (one collective; call on every rank, log steps only)."""
    if not is_initialized() or world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= world_size()
    return {k: v for k, v in zip(keys, t.cpu().tolist())}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over ranks (call on every rank)."""
    if not is_initialized() or world_size() == 1:
        return t
    t = t.clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu()


def first_of_ranks(value):
    """Collective: the first non-None `value` in rank order (e.g. an error one rank met), the
    same on every rank; None when every rank passed None."""
    if not is_initialized() or world_size() == 1:
        return value
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, ...) of a CPU tensor, concatenated in rank order, on every rank
    (ranks may hold different counts, zero included)."""
    if not is_initialized() or world_size() == 1:
        return t
    counts = [None] * world_size()
    dist.all_gather_object(counts, len(t))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: len(t)] = t.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])


def broadcast_object(value):
    """Rank 0's `value` on every rank (any picklable object); the value itself in a world of one."""
    if not is_initialized() or world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
