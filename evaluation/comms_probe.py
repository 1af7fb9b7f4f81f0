"""Measure the collectives of LADD training steps per engine with DeepSpeed's comms logger: the
reference the communication plan (ladd_ds.training.comms_plan) is tested against.

    python -m evaluation.comms_probe --config configs/tiny_cpu.yaml --steps 2 --out comms.json  # each rank

Run on every rank (torchrun, deepspeed, or the tests' direct launch). Every engine's DeepSpeed
config gets `"comms_logger": {"enabled": true, "prof_all": true}`; `--warmup` training steps run
first (the first step records ZeRO-3's trace and init collectives run before it), then the logger
is cleared and `--steps` more steps run on synthetic batches. Rank 0 writes, per engine and
DeepSpeed op name (with `@N` appended for an op on a group of N ranks smaller than the world:
hpZ's secondary gathers), the logged message bytes per step (DeepSpeed's `msg_size`: the `tensor`
argument of the op, which is the rank's shard for an all-gather and the whole buffer for a
reduce-scatter or an all-reduce) and the number of calls per step.

Which engine an op belongs to: DeepSpeed logs one stream for the process, so each logged op is
attributed by walking the Python stack from the logger's `append` outwards to the first frame
whose `self` (or whose module or parameter arguments) belongs to an engine: its ZeRO optimizer,
its ZeRO-3 parameter coordinator, the engine itself or one of its modules or parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from evaluation.bench_step import synthetic_batch
from ladd_ds.config import load_config
from ladd_ds.core.precision import dtype_of
from ladd_ds.distributed import engines as ds
from ladd_ds.distributed.ranks import rank, world_size
from ladd_ds.methods import method_for

COMMS_LOGGER = {"enabled": True, "verbose": False, "prof_all": True}


def _owners(engines: dict) -> dict[int, str]:
    """id of every object that identifies an engine on the stack -> the engine's name."""
    owners: dict[int, str] = {}
    for name, engine in engines.items():
        objects = [engine, engine.module, *engine.module.modules(), *engine.module.parameters()]
        opt = getattr(engine, "optimizer", None)
        if opt is not None:
            objects += [opt, getattr(opt, "optimizer", None)]
            offload = getattr(opt, "parameter_offload", None)
            if offload is not None:
                objects += [offload, offload.get_param_coordinator()]
        for attr in ("parameter_offload", "zero_optimization_partition_weights"):
            offload = getattr(engine, attr, None)
            if offload is not None and hasattr(offload, "get_param_coordinator"):
                objects += [offload, offload.get_param_coordinator()]
        owners.update({id(o): name for o in objects if o is not None})
    return owners


def _engine_on_stack(owners: dict[int, str]) -> str:
    frame = sys._getframe(2)
    while frame is not None:
        for value in frame.f_locals.values():
            if id(value) in owners:
                return owners[id(value)]
            if isinstance(value, list | tuple) and value and id(value[0]) in owners:
                return owners[id(value[0])]
        frame = frame.f_back
    return "unattributed"


def measure(cfg, *, warmup: int, steps: int) -> dict:
    """Per engine and op: logged bytes and calls per training step, averaged over `steps`."""
    # Not at the top, where isort puts deepspeed before ladd_ds: deepspeed picks its accelerator
    # when first imported, after ladd_ds.distributed.engines has prepared the launcher's variables.
    import deepspeed.comm as dist
    import deepspeed.comm.comm as ds_comm

    method_class = method_for(cfg, "train")
    configs = method_class.ds_configs(cfg, world_size())
    for c in configs.values():
        c["comms_logger"] = dict(COMMS_LOGGER)
    method = method_class.build(cfg, configs)
    engines = {"student": method.engines.student, "heads": method.engines.heads, "teacher": method.engines.teacher}
    owners = _owners(engines)
    logger = ds_comm.comms_logger
    records: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    append = logger.append

    def attributed_append(raw_name, record_name, latency, msg_size):
        # The group the op ran on: the `func_args` of DeepSpeed's timed_op wrapper, our caller.
        group = sys._getframe(1).f_locals.get("func_args", {}).get("group")
        size = dist.get_world_size(group)
        entry = records[(_engine_on_stack(owners), raw_name if size == world_size() else f"{raw_name}@{size}")]
        entry[0] += msg_size
        entry[1] += 1
        return append(raw_name, record_name, latency, msg_size)

    logger.append = attributed_append
    teacher_cfg = method.engines.teacher.module.transformer.config
    rl = cfg.data.random_latents
    dtype = dtype_of(cfg.deepspeed.precision, key="deepspeed.precision")
    batch = synthetic_batch(teacher_cfg, cfg.data.micro_batch_size, (rl.height, rl.width), rl.text_len, ds.device(), dtype)
    secondary = SecondaryShards(engines)
    for step in range(warmup + steps):
        if step == warmup:
            logger.reset_data()
            records.clear()
        with secondary if step >= warmup else contextlib.nullcontext():
            method.train_step([batch] * cfg.optim.grad_accum, step)
    logged = sum(size * vals[0] for ops in logger.get_raw_data().values() for size, vals in ops.items())
    attributed = sum(v[0] for v in records.values())
    assert logged == attributed, f"the logger holds {logged} bytes, {attributed} were attributed"
    out: dict = defaultdict(dict)
    for (engine, op), (size, calls) in sorted(records.items()):
        out[engine][op] = {"bytes": size / steps, "calls": calls / steps}
    return {"world_size": world_size(), "steps": steps, "engines": dict(out), "hpz_secondary_elements": secondary.peak}


class SecondaryShards(TorchDispatchMode):
    """The most elements of ZeRO++ hpZ secondary weight shards (`ds_secondary_tensor`) each
    engine holds on this rank, read before every op of the steps it is entered for."""

    def __init__(self, engines: dict):
        super().__init__()
        self.params = {name: list(e.module.parameters()) for name, e in engines.items()}
        self.peak = dict.fromkeys(engines, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for name, params in self.params.items():
            held = sum(p.ds_secondary_tensor.numel() for p in params if getattr(p, "ds_secondary_tensor", None) is not None)
            self.peak[name] = max(self.peak[name], held)
        return func(*args, **(kwargs or {}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--warmup", type=int, default=2, help="steps before the logger is cleared")
    p.add_argument("--steps", type=int, default=1, help="steps measured")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    args = p.parse_args(argv)
    ds.init_distributed()
    cfg = load_config(args.config, args.set)
    result = measure(cfg, warmup=args.warmup, steps=args.steps)
    if rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
