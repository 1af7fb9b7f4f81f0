"""Where each engine's weights live: the per-rank memory plan and the `auto` ZeRO stages.

A run has trainable engines (the student, the discriminator heads; DPO's model) and frozen ones
(the teacher; DPO's reference). `deepspeed.<engine>_stage: auto` picks each one's ZeRO stage from
the plan below (docs/performance.md, "Placement"):

- a trainable engine: ZeRO-0 on one rank (there is nothing to shard; ZeRO-1 instead in bf16 with
  gradient accumulation when its template asks for fp32 accumulation: the lowest stage that has
  it), else ZeRO-2 when the run fits the device with it, else ZeRO-3;
- a frozen engine: replicated (ZeRO-0, no gathers at all) on one rank or when the run fits the
  device with it replicated next to the trainable engines' chosen stages, else ZeRO-3.

On one rank no stage saves memory; a run that does not fit is reported at start, not refused (the
plan is an estimate); `--dry-run` exits 2 for it.

Per-rank bytes of one engine (bf16 training; fp32 doubles weights and has no master copy):
weights 2 B/param, sharded by ZeRO-3; gradients 2 B/param in the model dtype below ZeRO-2 (plus an
fp32 copy for ZeRO-1's fp32 accumulation), an fp32 partition of 4 B/param/world from ZeRO-2 on
(with `data_types.grad_accum_dtype: fp32`; 2 B without); Adam 12 B/param (fp32 master + two
moments), sharded from ZeRO-1 on; the optimizer step's temporaries (`adamw_temporaries`: none
for the fused AdamW a GPU runs, one or two fp32 copies of the stepped tensors otherwise; at
ZeRO-0 in bf16, `master_step_temporaries`: one chunk of fp32 gradient copies); the EMA of a
trained model (optim.ema_decay > 0) 4 B/param, sharded from ZeRO-1 on; buffers: ZeRO's reduce
bucket (doubled with `overlap_comm`), the ZeRO-1/2 all-gather bucket and ZeRO-3's live
parameters (`zero3_live_params`: prefetch bucket plus the largest module, or block with leaf
blocks, capped by `stage3_max_live_parameters`; what a real step keeps is more, docs/performance.md
"ZeRO-3 live parameters"), plus the persistent small parameters. Activations (`StepActivations`) are counted by the method from
its own step code on meta models (ladd_ds.models.activations): what each phase of a step (LADD:
the generator step, the discriminator step) keeps for backward, plus the largest checkpointed
block's recompute; the plan takes the largest phase.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ladd_ds.distributed.flat import MASTER_CHUNK_ELEMENTS, chunks_by_elements
from ladd_ds.distributed.zero_sizes import block_params, resolve_zero3_sizes

GIB = 2**30
# Fraction of the device memory the plan may fill: the rest is for the CUDA context, the
# allocator's fragmentation and kernels' workspaces.
USABLE_FRACTION = 0.9
AUTO = "auto"


@dataclass(frozen=True)
class EngineNeeds:
    """What the plan needs of one engine: its model (built on the meta device), whether it trains,
    the stage asked for (an int, or "auto") and its DeepSpeed config (buckets, accumulation dtype)."""

    name: str
    model: nn.Module
    trainable: bool
    stage: int | str
    ds_config: dict
    ema: bool = False  # the run keeps an EMA of this engine's trained weights (training/ema.py)
    adamw: str = "fused"  # the torch AdamW implementation its optimizer runs (engines.adamw_kind)
    leaf_blocks: bool = False  # its blocks are ZeRO-3 leaf modules (deepspeed.z3_leaf_blocks): gathered whole
    # The most elements of non-persistent parameters ZeRO-3 holds gathered in a training step
    # under a resolved DeepSpeed config: the method's step replayed (training/zero3_replay.py).
    # None: the prefetch bucket plus the gather unit, a lower estimate (zero3_live_params).
    live_window: Callable[[dict], float] | None = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_trained(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.trainable else 0


@dataclass(frozen=True)
class EngineMemory:
    weights: float
    grads: float
    optimizer: float
    buffers: float
    ema: float = 0.0
    optimizer_temps: float = 0.0  # what the optimizer step allocates and frees (adamw_temporaries)
    zero3_live: float = 0.0  # elements of non-persistent parameters ZeRO-3 holds gathered at most (in `buffers`)
    hpz_secondary: float = 0.0  # elements of ZeRO++ hpZ secondary weight shards per rank (in `weights`)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buffers + self.ema + self.optimizer_temps


@dataclass(frozen=True)
class StepActivations:
    """Bytes autograd keeps for backward in each phase of a training step (a LADD step's G step
    and D step), counted from the code (ladd_ds.models.activations). The step's peak is the
    largest phase: the phases run one after the other, each freeing its graph in backward."""

    kept: dict[str, dict[str, int]]  # phase -> model (or "other": losses, noise) -> bytes at the end of its forward
    recompute: dict[str, int]  # phase -> what checkpointed blocks add in its backward (one block's saved bytes)
    recompute_flops: float = 0.0  # the FLOPs checkpointing adds, relative to the step without it
    flops: float = 0.0  # one micro-batch's step, forward and backward, recompute included (counted with FLOPs)
    note: str = ""

    def phase_bytes(self, phase: str) -> int:
        return sum(self.kept[phase].values()) + self.recompute.get(phase, 0)

    @property
    def peak_phase(self) -> str:
        return max(self.kept, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.phase_bytes(self.peak_phase)


@dataclass
class Placement:
    stages: dict[str, int]
    memory: dict[str, EngineMemory]
    activations: float
    device_bytes: float
    params: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    steps: StepActivations | None = None  # `activations` by phase (the --dry-run report)

    @property
    def total(self) -> float:
        return sum(m.total for m in self.memory.values()) + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes * USABLE_FRACTION


def _zero_settings(ds_config: dict) -> dict:
    """The zero_optimization values the plan reads, with DeepSpeed's defaults (0.19.8)."""
    z = ds_config.get("zero_optimization", {})
    return {
        "reduce_bucket_size": float(z.get("reduce_bucket_size", 5e8)),
        "allgather_bucket_size": float(z.get("allgather_bucket_size", 5e8)),
        "overlap_comm": bool(z.get("overlap_comm", False)),
        "prefetch": float(z.get("stage3_prefetch_bucket_size", 5e7)),
        "persistence": float(z.get("stage3_param_persistence_threshold", 1e5)),
        "max_live": float(z.get("stage3_max_live_parameters", 1e9)),
        "sub_group": float(z.get("sub_group_size", 1e9)),
    }


def _fp32_accumulation(ds_config: dict) -> bool:
    return ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def _largest_module_params(model: nn.Module) -> int:
    """Parameters of the largest module that owns parameters directly: ZeRO-3 gathers per module."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def zero3_gather_unit(engine: EngineNeeds) -> int:
    """Elements of the largest set of parameters ZeRO-3 gathers at once for one module: a module's
    own parameters, or with leaf blocks (distributed/engines.py set_leaf_blocks) a whole block, as
    the coordinator gathers a leaf module's parameters recursively (partitioned_param_coordinator.py
    `iter_params(..., recurse=is_leaf)`); the modules outside the blocks still gather their own."""
    unit = _largest_module_params(engine.model)
    return max(unit, block_params(engine.model)) if engine.leaf_blocks else unit


def zero3_live_params(engine: EngineNeeds, ds_config: dict) -> float:
    """Elements of non-persistent parameters the plan counts as gathered at once under ZeRO-3:
    the engine's replayed step (`live_window`) when it has one, else the prefetch bucket plus the
    module being computed (zero3_gather_unit), capped by `stage3_max_live_parameters` and by the
    model: what DeepSpeed adds to the unit it computes, not what it keeps for later uses
    (docs/performance.md, "ZeRO-3 live parameters"). `ds_config` with its "auto" sizes resolved."""
    if engine.live_window is not None:
        return float(engine.live_window(ds_config))
    z = _zero_settings(ds_config)
    # DeepSpeed keeps parameters of up to `stage3_param_persistence_threshold` elements gathered.
    n = sum(p.numel() for p in engine.model.parameters() if p.numel() > z["persistence"])
    return min(z["max_live"], z["prefetch"] + zero3_gather_unit(engine), n)


def optimizer_steps(model: nn.Module, *, stage: int, world: int, sub_group_size: float) -> list[list[int]]:
    """What one optimizer step hands torch's AdamW: a list per `optimizer.step()` call of the
    elements of each tensor it steps. ZeRO-0: one call over the trained parameters (DeepSpeed
    hands it the model's, or their fp32 copies); ZeRO-1/2: one flat fp32 partition per parameter
    group (stage_1_and_2.py; one group here); ZeRO-3: one call per sub-group of the partition
    (stage3.py `_create_fp16_sub_groups`: greedy, up to `sub_group_size` elements)."""
    trained = [p.numel() for p in model.parameters() if p.requires_grad]
    if stage == 0:
        return [trained]
    if stage in (1, 2):
        return [[math.ceil(sum(trained) / world)]]
    groups, size = [], 0
    for n in trained:
        size += math.ceil(n / world)
        if size >= sub_group_size:
            groups.append([size])
            size = 0
    return groups + ([[size]] if size else [])


def adamw_temporaries(kind: str, steps: list[list[int]], *, state_bytes: int = 4) -> float:
    """Peak bytes torch AdamW allocates on top of its state while stepping `steps`
    (optimizer_steps; torch/optim/adam.py, torch 2.14), for each of its implementations:
    - "fused": none (one kernel updates parameters and moments in place);
    - "foreach": `_foreach_sqrt` of every second moment of a call at once, one state-sized
      tensor per stepped tensor;
    - "for-loop" (torch's default on a CPU, which has no foreach kernels): per tensor,
      `exp_avg_sq.sqrt() / bias_correction2_sqrt` holds two temporaries while the previous
      tensor's `denom` is still referenced.
    Scalars (step counters, bias corrections) are left out. ZeRO hands AdamW flat fp32
    partitions, so under ZeRO-1/2/3 a non-fused step holds one or two partitions' worth."""
    steps = [s for s in steps if s]
    if kind == "fused" or not steps:
        return 0.0
    if kind == "foreach":
        return float(max(sum(s) for s in steps) * state_bytes)
    if kind == "for-loop":
        return float(max(max(p + 2 * n for p, n in zip([0, *s[:-1]], s)) for s in steps) * state_bytes)
    raise ValueError(f"unknown AdamW implementation {kind!r} (fused, foreach, for-loop)")


def master_step_temporaries(model: nn.Module) -> float:
    """Peak bytes the master-weight AdamW of a bf16 ZeRO-0 engine (distributed/engines.py
    MasterWeightAdamW) allocates while stepping: the fp32 copies of one chunk's bf16 gradients
    (MASTER_CHUNK_ELEMENTS at most, unless one parameter is larger); its fused kernel allocates
    nothing. The gradient norm's per-parameter scalars are left out."""
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    chunks = chunks_by_elements(numels, MASTER_CHUNK_ELEMENTS)
    return float(max(sum(numels[i] for i in chunk) for chunk in chunks) * 4)


def engine_memory(engine: EngineNeeds, *, stage: int, world: int, precision: str) -> EngineMemory:
    """Bytes per rank of one engine at `stage` (the module docstring has the arithmetic)."""
    bf16 = precision == "bf16"
    weight_b = 2 if bf16 else 4
    n, trained = engine.n_params, engine.n_trained
    # "auto" live/prefetch sizes resolve as the engine's own config does (distributed/zero_sizes.py).
    resolved = resolve_zero3_sizes(engine.ds_config, engine.model)
    z = _zero_settings(resolved)
    fp32_accum = bf16 and _fp32_accumulation(engine.ds_config)
    comm_b = 4 if engine.ds_config.get("communication_data_type") == "fp32" or not bf16 else 2

    weights = n * weight_b / (world if stage >= 3 else 1)
    grads = optimizer = buffers = 0.0
    if trained:
        if stage >= 2:
            grads = trained * (4 if fp32_accum else weight_b) / world
        else:
            grads = trained * weight_b + (trained * 4 if stage == 1 and fp32_accum else 0)
        optimizer = trained * (12 if bf16 else 8) / (world if stage >= 1 else 1)
        if world > 1 or stage >= 1:
            buffers += min(z["reduce_bucket_size"], trained) * comm_b * (2 if z["overlap_comm"] else 1)
        if stage in (1, 2):
            buffers += min(z["allgather_bucket_size"], trained) * weight_b
    # The EMA (training/ema.py): an fp32 copy of what this rank's partition owns, its ZeRO-3
    # shards or its ZeRO-1/2 optimizer partition; the whole model only at ZeRO-0 (32 GB for 8B).
    ema = trained * 4 / (world if stage >= 1 else 1) if engine.ema else 0.0
    live = secondary = 0.0
    if stage >= 3:
        persistent = sum(p.numel() for p in engine.model.parameters() if p.numel() <= z["persistence"])
        live = zero3_live_params(engine, resolved)
        buffers += (persistent + live) * weight_b
        hpz = int(resolved.get("zero_optimization", {}).get("zero_hpz_partition_size", 1))
        if 1 < hpz < world:
            # ZeRO++ hpZ keeps a second shard of every released weight within its group of hpz
            # ranks (partition_parameters.py _partition_param_sec): the world-padded tensor / hpz.
            secondary = sum(
                math.ceil(p.numel() / world) * world / hpz for p in engine.model.parameters() if p.numel() > z["persistence"]
            )
            weights += secondary * weight_b
    # The optimizer's state is fp32 in both precisions (bf16 runs step an fp32 master copy).
    temps = 0.0
    if trained and stage == 0 and bf16:
        temps = master_step_temporaries(engine.model)
    elif trained:
        stepped = optimizer_steps(engine.model, stage=stage, world=world, sub_group_size=z["sub_group"])
        temps = adamw_temporaries(engine.adamw, stepped)
    return EngineMemory(
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        buffers=buffers,
        ema=ema,
        optimizer_temps=temps,
        zero3_live=live,
        hpz_secondary=secondary,
    )


def plan(
    engines: list[EngineNeeds], *, stages: dict[str, int], world: int, precision: str, activations: float, device_bytes: float
) -> Placement:
    memory = {e.name: engine_memory(e, stage=stages[e.name], world=world, precision=precision) for e in engines}
    params = {e.name: e.n_params for e in engines}
    return Placement(stages=dict(stages), memory=memory, activations=activations, device_bytes=device_bytes, params=params)


def choose_placement(
    engines: list[EngineNeeds],
    *,
    world: int,
    precision: str,
    grad_accum: int,
    activations: float,
    device_bytes: float,
    step_time: Callable[[dict[str, int]], float] | None = None,
) -> Placement:
    """Resolve every "auto" stage (module docstring); explicit stages are kept as asked. With
    `step_time` (seconds per step of a full stage assignment: the communication plan,
    training/comms_plan.py), the fastest assignment that fits instead, trained engines at ZeRO-2
    or 3, frozen ones at 0 or 3."""
    stages = {e.name: e.stage for e in engines if e.stage != AUTO}
    reasons = {e.name: "asked for in the config" for e in engines if e.stage != AUTO}
    trainable = [e for e in engines if e.stage == AUTO and e.trainable]
    frozen = [e for e in engines if e.stage == AUTO and not e.trainable]
    usable = device_bytes * USABLE_FRACTION
    if step_time is not None and world > 1 and (trainable or frozen):
        auto = trainable + frozen
        options = [(2, 3) if e.trainable else (0, 3) for e in auto]
        timed = []
        for choice in itertools.product(*options):
            full = {**stages, **{e.name: s for e, s in zip(auto, choice)}}
            need = plan(
                engines, stages=full, world=world, precision=precision, activations=activations, device_bytes=device_bytes
            ).total
            if need <= usable:
                timed.append((step_time(full), need, full))
        if timed:
            seconds, need, best = min(timed, key=lambda t: t[0])
            for e in auto:
                reasons[e.name] = (
                    f"fastest of {len(timed)} placement(s) that fit: {seconds:.2f} s per step (communication plan), "
                    f"{need / GIB:.1f} of {usable / GIB:.1f} GiB"
                )
            placement = plan(
                engines, stages=best, world=world, precision=precision, activations=activations, device_bytes=device_bytes
            )
            placement.reasons = reasons
            return placement

    def total_with(candidate: dict[str, int]) -> float:
        # Engines not decided yet are counted at their smallest footprint (ZeRO-3).
        full = {e.name: candidate.get(e.name, stages.get(e.name, 3)) for e in engines}
        return plan(
            engines, stages=full, world=world, precision=precision, activations=activations, device_bytes=device_bytes
        ).total

    for e in trainable:
        if world == 1:
            if precision == "bf16" and grad_accum > 1 and _fp32_accumulation(e.ds_config):
                stages[e.name], reasons[e.name] = 1, "one rank: nothing to shard; ZeRO-1 accumulates gradients in fp32"
            else:
                stages[e.name], reasons[e.name] = 0, "one rank: nothing to shard"
            continue
        need = total_with({**stages, e.name: 2})
        if need <= usable:
            stages[e.name], reasons[e.name] = 2, f"the run fits with it under ZeRO-2 ({need / GIB:.1f} of {usable / GIB:.1f} GiB)"
        else:
            stages[e.name], reasons[e.name] = 3, f"under ZeRO-2 the run needs {need / GIB:.1f} GiB > {usable / GIB:.1f} usable"
    for e in frozen:
        need = total_with({**stages, e.name: 0})
        if world == 1:
            stages[e.name], reasons[e.name] = 0, "one rank: nothing to shard"
        elif need <= usable:
            stages[e.name], reasons[e.name] = 0, f"fits replicated ({need / GIB:.1f} of {usable / GIB:.1f} GiB)"
        else:
            stages[e.name], reasons[e.name] = 3, f"replicated the run needs {need / GIB:.1f} GiB > {usable / GIB:.1f} usable"
    placement = plan(engines, stages=stages, world=world, precision=precision, activations=activations, device_bytes=device_bytes)
    placement.reasons = reasons
    return placement


def format_placement(p: Placement) -> list[str]:
    """The --dry-run table: bytes per rank of every engine at its chosen stage, and why."""
    head = f"{'engine':<9}{'params':>15}{'ZeRO':>5}{'weights':>10}{'grads':>10}{'optim':>10}{'opt tmp':>10}{'ema':>10}"
    lines = [head + f"{'buffers':>10}{'GiB/rank':>10}"]
    for name, m in p.memory.items():
        lines.append(
            f"{name:<9}{p.params[name]:>15,}{p.stages[name]:>5}{m.weights / GIB:>10.2f}{m.grads / GIB:>10.2f}"
            f"{m.optimizer / GIB:>10.2f}{m.optimizer_temps / GIB:>10.2f}{m.ema / GIB:>10.2f}{m.buffers / GIB:>10.2f}"
            f"{m.total / GIB:>10.2f}"
        )
    return lines


def format_activations(steps: StepActivations, width: int) -> list[str]:
    """The --dry-run activation lines: each phase's bytes by model, its recompute, and the peak;
    GiB right-aligned at `width`."""
    lines = []
    for phase, kept in steps.kept.items():
        parts = ", ".join(f"{name} {b / GIB:.2f}" for name, b in kept.items() if b)
        if steps.recompute.get(phase):
            parts += f", recompute {steps.recompute[phase] / GIB:.2f}"
        lines.append(f"{'  ' + phase:<20}{steps.phase_bytes(phase) / GIB:>{width}.2f}   ({parts})")
    return lines
