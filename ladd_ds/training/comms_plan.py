"""The communication plan: bytes per training step of every engine and collective, and what they
cost in time next to the step's compute (docs/performance.md, "Communication").

Units. `logged` bytes are the message sizes DeepSpeed's comms logger records (deepspeed/comm/
comm.py: the op's `tensor` argument): for an all-gather the rank's own shard, for a reduce-scatter
and an all-reduce the whole buffer. `wire` bytes are what one rank sends over its link in a ring
algorithm (NCCL's bus bytes): all-gather (n-1) x shard, reduce-scatter (n-1)/n x buffer,
all-reduce 2 (n-1)/n x buffer, for a group of n ranks. Times use wire bytes.

Bytes per step of one engine of N parameters (n_t trained), on a group of n ranks (deepspeed
0.19.8; w = 2 bytes per weight in bf16, 4 in fp32; c = the gradient reduction's dtype,
4 with `communication_data_type: fp32`, else the weights'; a = optim.grad_accum):

- ZeRO-3 all-gather: each use of a module gathers its non-persistent parameters (under
  `stage3_param_persistence_threshold` elements a parameter stays gathered), w x ceil(numel / n)
  logged per parameter, unless they are still gathered from an earlier use: which ones are is
  DeepSpeed's parameter coordinator's decision, replayed on the module order of a meta forward
  (training/zero3_replay.py: prefetch, reuse distance, the optimizer step releasing everything, a
  frozen engine keeping what it held). ZeRO++ hpZ (`zero_hpz_partition_size` h): a gather after
  a module's first since the last step reads secondary shards within groups of h ranks
  (w x numel / h logged per parameter).
- ZeRO-2/3 gradient reduction after every backward that produces the engine's gradients (a per
  step): ZeRO-3 reduce-scatter c x n x ceil(numel / n) per parameter; ZeRO-2 (and ZeRO-1, ZeRO-0
  once per step) an all-reduce of c x n_t (`use_multi_rank_bucket_allreduce`, the default) in
  `reduce_bucket_size` pieces: 2 (n-1)/n x c x n_t on the wire, twice a reduce-scatter's.
- ZeRO-1/2 all-gather of the updated weights after the step: w x n_t / n logged.
- The gradient-norm all-reduce of a ZeRO-1/2/3 step: 4 or 8 bytes.

For an 8B student at ZeRO-2 with fp32 communication that is 32 GB all-reduced per micro-batch, 64
GB on the wire per rank; at ZeRO-3 16 GB x (n-1)/n on the wire per gathered pass (16 GB / n
logged) and 32 GB reduce-scattered, 32 GB x (n-1)/n on the wire.

A LADD step per micro-batch (ladd/steps.py): the student's forward and backward (generator step),
the teacher's forward on the re-noised fakes with the backward through it into the student, and
(discriminator step) the teacher's forward on the re-noised reals, the heads' forward and
backward. `ladd_schedule` writes that as events per engine: R (a top-level forward: DeepSpeed
resets the trace), F (a forward through the modules), B (the backward; b: with the engine's
parameters frozen), S (the optimizer step), E (a frozen engine releasing everything at the
step's end: engines.release_frozen).

Time: a collective on a group within a node (n <= gpus_per_node) runs at the intra-node
bandwidth per GPU, otherwise at the inter-node bandwidth per GPU (the ring's slowest link).
Compute time is the step's FLOPs (counted on the meta device with torch's FlopCounterMode) at an
assumed achieved TFLOP/s. Exposed communication, what does not overlap compute:

- ZeRO-3 gathers overlap the compute through prefetch, except the first prefetch bucket of every
  pass; the gradient reduction overlaps the backward with `overlap_comm`, except the last reduce
  bucket; all of it is exposed without `overlap_comm`;
- the ZeRO-1/2 all-gather after the step is exposed (nothing computes then);
- overlapped communication beyond the compute time is exposed too (the link is the bottleneck).

Step time = compute + exposed communication; scaling efficiency = compute / step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ladd_ds.core.errors import InputError
from ladd_ds.training.zero3_replay import EngineLayout, replay

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")
# DeepSpeed's op names (as logged) -> the plan's collectives.
DS_OPS = {
    "all_gather_into_tensor": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "all_reduce": "all_reduce",
}
# The global gradient norm's all-reduce per step (measured, deepspeed 0.19.8): 8 bytes under ZeRO-3, 4 under ZeRO-1/2.
NORM_BYTES = {1: 4, 2: 4, 3: 8}
GB = 1e9


@dataclass(frozen=True)
class Interconnect:
    """Bandwidth per GPU within a node and between nodes (GB/s), and GPUs per node."""

    intra_node_gbs: float
    inter_node_gbs: float
    gpus_per_node: int

    @classmethod
    def parse(cls, text: str) -> Interconnect:
        """ "INTRA_GBPS,INTER_GBPS,GPUS_PER_NODE" in Gbit/s per GPU, e.g. "3600,400,8" (NVLink
        ~450 GB/s, 400 Gb/s InfiniBand per GPU, 8 GPUs a node)."""
        parts = text.split(",")
        try:
            intra, inter, per_node = float(parts[0]), float(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise InputError(
                f"--interconnect {text!r}: expected INTRA_GBPS,INTER_GBPS,GPUS_PER_NODE (Gbit/s per GPU), e.g. 3600,400,8"
            ) from None
        if len(parts) != 3 or intra <= 0 or inter <= 0 or per_node < 1:
            raise InputError(f"--interconnect {text!r}: bandwidths must be > 0 and GPUS_PER_NODE >= 1")
        return cls.from_gbps(intra, inter, per_node)

    @classmethod
    def from_gbps(cls, intra_gbps: float, inter_gbps: float, gpus_per_node: int) -> Interconnect:
        return cls(intra_node_gbs=intra_gbps / 8, inter_node_gbs=inter_gbps / 8, gpus_per_node=gpus_per_node)

    def bandwidth(self, group: int) -> float:
        """Bytes/s per GPU of a ring over `group` ranks (consecutive ranks fill a node first)."""
        return (self.intra_node_gbs if group <= self.gpus_per_node else self.inter_node_gbs) * GB


# ----------------------------------------------------------------------------- the step's plan


@dataclass(frozen=True)
class EngineStep:
    """What one engine does in a training step."""

    name: str
    layout: EngineLayout
    stage: int
    ds_config: dict
    events: str  # R, F, B, S (ladd_schedule)
    reductions: int  # backwards that produce its gradients (0: frozen)
    flops: float  # its FLOPs in the step (forwards, backwards, recomputes)


@dataclass
class Collective:
    logged: float = 0.0  # bytes as DeepSpeed's comms logger records them
    wire: float = 0.0  # bytes one rank sends (ring)
    seconds: float = 0.0
    exposed: float = 0.0
    logged_in_groups: float = 0.0  # the part of `logged` on groups smaller than the world (hpZ)
    wire_in_groups: float = 0.0  # the part of `wire` sent within those groups
    group: int = 0  # their size

    def add(self, *, logged: float, wire: float, group: int | None = None) -> None:
        self.logged += logged
        self.wire += wire
        if group is not None:
            self.logged_in_groups += logged
            self.wire_in_groups += wire
            self.group = group


@dataclass
class CommsPlan:
    world: int
    engines: dict[str, dict[str, Collective]] = field(default_factory=dict)
    compute_s: float = 0.0
    stages: dict[str, int] = field(default_factory=dict)
    timed: bool = False

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for e in self.engines.values() for c in e.values())

    @property
    def exposed_s(self) -> float:
        return sum(c.exposed for e in self.engines.values() for c in e.values())

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s if self.step_s else 1.0


def _zero(ds_config: dict) -> dict:
    return ds_config.get("zero_optimization", {})


def comm_bytes(ds_config: dict, precision: str) -> int:
    """Bytes per element of the gradient reduction."""
    if ds_config.get("communication_data_type") == "fp32" or precision == "fp32":
        return 4
    return 2


def hpz_size(ds_config: dict) -> int:
    return int(_zero(ds_config).get("zero_hpz_partition_size", 1))


def engine_bytes(step: EngineStep, *, world: int, precision: str) -> dict[str, Collective]:
    """Logged and wire bytes per collective of one engine in one step (module docstring)."""
    w = 2 if precision == "bf16" else 4
    c = comm_bytes(step.ds_config, precision)
    out = {k: Collective() for k in COLLECTIVES}
    if world == 1:
        return out
    z = _zero(step.ds_config)
    n_t = sum(step.layout.trained_numels)
    if step.stage >= 3:
        replayed = replay(step.layout, step.events, world=world, zero=z)
        shards, within = replayed.gathered, replayed.within
        out["all_gather"].add(logged=shards * w, wire=shards * w * (world - 1))
        if within:
            h = hpz_size(step.ds_config)
            out["all_gather"].add(logged=within * w, wire=within * w * (h - 1), group=h)
        padded = sum(world * math.ceil(n / world) for n in step.layout.trained_numels)
        out["reduce_scatter"].add(logged=step.reductions * padded * c, wire=step.reductions * padded * c * (world - 1) / world)
    elif n_t and step.reductions:
        times = step.reductions if step.stage == 2 else 1
        out["all_reduce"].logged += times * n_t * c
        out["all_reduce"].wire += times * n_t * c * 2 * (world - 1) / world
        if step.stage in (1, 2):
            align = 2 * world  # DeepSpeed pads the flat group to a multiple of 2 x world elements
            shard = math.ceil(n_t / align) * align / world
            out["all_gather"].logged += shard * w
            out["all_gather"].wire += shard * w * (world - 1)
    if n_t and step.reductions and step.stage >= 1:
        out["all_reduce"].logged += NORM_BYTES[min(step.stage, 3)]
        out["all_reduce"].wire += NORM_BYTES[min(step.stage, 3)] * 2 * (world - 1) / world
    return out


def engine_times(
    step: EngineStep, coll: dict[str, Collective], *, world: int, precision: str, net: Interconnect, tflops: float
) -> None:
    """Seconds and exposed seconds per collective (module docstring: the overlap model)."""
    bw = net.bandwidth(world)
    z = _zero(step.ds_config)
    overlap = bool(z.get("overlap_comm", False))
    w = 2 if precision == "bf16" else 4
    compute = step.flops / (tflops * 1e12)
    for k in coll.values():
        k.seconds = (k.wire - k.wire_in_groups) / bw + (k.wire_in_groups / net.bandwidth(k.group) if k.group else 0.0)
    if step.stage >= 3 and coll["all_gather"].seconds:
        g = coll["all_gather"]
        passes = sum(step.events.count(e) for e in "FBb")
        # The first prefetch bucket of every pass waits for its gather; the rest is prefetched.
        first = min(g.seconds, passes * float(z.get("stage3_prefetch_bucket_size", 5e7)) * w * (world - 1) / world / bw)
        g.exposed = g.seconds if not overlap else first + max(0.0, g.seconds - first - compute)
    reduce = coll["reduce_scatter"] if step.stage >= 3 else coll["all_reduce"]
    if reduce.seconds:
        # The last reduce bucket of every backward is reduced after the backward's compute ends.
        c = comm_bytes(step.ds_config, precision)
        factor = (world - 1) / world * (1 if step.stage >= 3 else 2)
        last = min(reduce.seconds, step.reductions * float(z.get("reduce_bucket_size", 5e8)) * c * factor / bw)
        backward = compute * 2 / 3
        reduce.exposed = reduce.seconds if not overlap else last + max(0.0, reduce.seconds - last - backward)
    if step.stage in (1, 2):
        coll["all_gather"].exposed = coll["all_gather"].seconds  # after the step: nothing to overlap


def ladd_schedule(cfg) -> dict[str, tuple[str, int]]:
    """Events (R F B S) per step and backwards per step of the student, teacher and heads
    (ladd/steps.py). Per micro-batch, generator step: the student's forward; the teacher's on
    the fakes (and, with ladd.distill_cfg != 1, once more on the empty prompt before the
    backward); the heads' forward through `.module`; one backward through all three. Then per
    micro-batch, discriminator step: without ladd.reuse_fakes the student's forward again (no
    grad); the teacher's forward (reals, or reals and fakes); the heads' forward (and the R1
    penalty's second one) and backward. The trained engines step at the end."""
    a = cfg.optim.grad_accum
    extra_teacher = "RF" if cfg.ladd.distill_weight > 0 and (cfg.ladd.distill_cfg or 1.0) != 1.0 else ""
    # b: a backward with the parameters frozen: the teacher's, and the heads' in the generator step.
    student_g, teacher_g, heads_g = "RFB", "RF" + extra_teacher + "b", "RFb"
    student_d = "" if cfg.ladd.reuse_fakes else "RF"
    heads_d = "RF" + ("RF" if cfg.ladd.r1_gamma > 0 else "") + "B"
    return {
        "student": (student_g * a + student_d * a + "S", a),
        "teacher": (teacher_g * a + "RF" * a + "E", 0),
        "heads": (heads_g * a + heads_d * a + "S", a),
    }


def plan_step(steps: list[EngineStep], *, world: int, precision: str, net: Interconnect | None, tflops: float) -> CommsPlan:
    plan = CommsPlan(world=world)
    plan.compute_s = sum(s.flops for s in steps) / (tflops * 1e12)
    for s in steps:
        coll = engine_bytes(s, world=world, precision=precision)
        if net is not None:
            engine_times(s, coll, world=world, precision=precision, net=net, tflops=tflops)
        plan.engines[s.name] = coll
    plan.stages = {s.name: s.stage for s in steps}
    plan.timed = net is not None
    return plan


def format_plan(plan: CommsPlan) -> list[str]:
    """The --dry-run communication table: per engine and collective, GB per step and rank as the
    comms logger records them and on the wire, and with an interconnect the time and the exposed
    time; then compute, step time and scaling efficiency."""
    lines = [
        f"communication per step and rank (world size {plan.world}; logged: message bytes as DeepSpeed's comms "
        "logger records them, wire: sent by one rank in a ring):",
        f"{'engine':<9}{'ZeRO':>5}  {'collective':<15}{'logged GB':>11}{'wire GB':>10}"
        + (f"{'s':>8}{'exposed s':>11}" if plan.timed else ""),
    ]
    for name, coll in plan.engines.items():
        for k, c in coll.items():
            if c.logged:
                row = f"{name:<9}{plan.stages[name]:>5}  {k:<15}{c.logged / GB:>11.3f}{c.wire / GB:>10.3f}"
                lines.append(row + (f"{c.seconds:>8.3f}{c.exposed:>11.3f}" if plan.timed else ""))
    if plan.timed:
        lines.append(
            f"compute {plan.compute_s:.3f} s (FLOPs at deepspeed.achieved_tflops), communication {plan.comm_s:.3f} s, "
            f"exposed {plan.exposed_s:.3f} s: step {plan.step_s:.3f} s, scaling efficiency {plan.efficiency:.1%}"
        )
    else:
        lines.append("(--interconnect INTRA,INTER,GPUS_PER_NODE or deepspeed.interconnect times it)")
    return lines
