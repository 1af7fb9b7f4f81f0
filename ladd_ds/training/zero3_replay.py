"""ZeRO-3's parameter coordinator replayed on a model's module order: what a training step gathers
(the communication plan's all-gather bytes) and the most it holds gathered at once (the memory
plan's ZeRO-3 live term), without running DeepSpeed (docs/performance.md, "ZeRO-3 live
parameters").

`trace_model` records, from one forward on meta tensors, what the coordinator reacts to: the
order in which the modules that carry ZeRO-3 hooks start and end, each one's parameters, whether
its output and its inputs require grad, and the checkpointed blocks. `replay` then follows
deepspeed 0.19.8's rules (runtime/zero/partitioned_param_coordinator.py and parameter_offload.py)
parameter by parameter over the events of a step (R, F, B, b, S, E: comms_plan.ladd_schedule):

- Hooks: every module gets them except the submodules of a ZeRO-3 leaf module
  (`deepspeed.z3_leaf_blocks`), which gathers all its parameters at once.
- Forward: a module's parameters are gathered when it starts and released when it ends; backward:
  gathered when its output's gradient arrives, released when its inputs' gradients are computed.
  A module none of whose inputs requires grad never gets that second hook: the backward's end
  releases it (stage3.py backward_epilogue for a trained engine's own backward; the LADD step
  calls the same release for the frozen teacher and heads).
- A checkpointed block runs its forward again inside the backward; a frozen engine's parameters
  gathered for that recompute stay until the block's backward ends.
- The trace: the module uses between the first two top-level forwards (R) after an invalid trace;
  a use that differs from it invalidates it. With a complete trace, a use prefetches the
  parameters ahead in the trace until `stage3_prefetch_bucket_size` elements are on their way
  (within `stage3_max_live_parameters`, counted from the last top-level forward), and a release
  keeps the parameters whose later use the prefetch has passed over or that are used again within
  `stage3_max_reuse_distance` elements of the trace. That decision is cached per module and trace
  position for the engine's life (an `lru_cache`), and the distance walk counts a module's
  parameters recursively when the released module is a leaf. Without a complete trace every use
  releases everything it gathered, persistent parameters included.
- Persistent parameters (at most `stage3_param_persistence_threshold` elements) are gathered at
  the start and again after every optimizer step (S), which releases everything. E (a frozen
  engine's `empty_partition_cache` at the end of a step, engines.release_frozen) releases
  everything too, persistent parameters included, which their next use gathers again.
- ZeRO++ hpZ (`zero_hpz_partition_size` h > 1): releasing a parameter keeps a secondary shard of
  it in its group of h ranks, and its next gathers read that until the optimizer step.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class EngineLayout:
    """What the replay needs of one engine's model, from one forward on meta tensors."""

    events: tuple[tuple[bool, int], ...]  # (started?, module) in call order, hooked modules only
    numels: tuple[int, ...]  # per parameter
    persistent: tuple[bool, ...]  # per parameter: stays gathered
    own: tuple[tuple[int, ...], ...]  # per module: the parameters a use gathers (a leaf's: all)
    direct: tuple[tuple[int, ...], ...]  # per module: its own parameters
    nested: tuple[tuple[int, ...], ...]  # per module: all parameters below it
    leaf: tuple[bool, ...]
    grad: tuple[bool, ...]  # its output requires grad (trained parameters)
    grad_frozen: tuple[bool, ...]  # ... with the parameters frozen
    input_grad: tuple[bool, ...]  # one of its positional inputs requires grad
    input_grad_frozen: tuple[bool, ...]
    checkpointed: tuple[int, ...]  # the modules that are checkpointed blocks
    trained_numels: tuple[int, ...]
    flops: float

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(m for started, m in self.events if started)


def _requires_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, tuple | list):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def trace_model(
    model: nn.Module,
    call,
    *,
    persistence_threshold: float,
    checkpointed: Sequence[nn.Module] = (),
    leaves: Sequence[nn.Module] = (),
    frozen_too: bool = False,
    count_flops: bool = True,
) -> tuple[EngineLayout, object]:
    """Run `call(model)` (a forward on meta tensors, returning its outputs) and record its
    EngineLayout. `checkpointed`: the blocks recomputed in backward (FlowModel.checkpointed_blocks);
    `leaves`: ZeRO-3 leaf modules (distributed/engines.py set_leaf_blocks); `frozen_too`: run again
    with the parameters frozen for `grad_frozen` (else it is `grad`); `count_flops` False leaves
    `flops` 0 (torch's FlopCounterMode made an 8B meta forward 2.4x slower). Returns the layout and
    what `call` returned."""

    modules = list(model.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    params = list(model.parameters())
    pindex = {id(p): i for i, p in enumerate(params)}
    leaf_ids = {id(m) for m in leaves}
    inside_leaf = {id(sub) for leaf in leaves for sub in leaf.modules() if sub is not leaf}
    hooked = [m for m in modules if id(m) not in inside_leaf]
    events: list[tuple[bool, int]] = []
    grad: dict[int, bool] = {}
    input_grad: dict[int, bool] = {}

    def pre_hook(module, args):
        events.append((True, index[id(module)]))
        input_grad.setdefault(index[id(module)], _requires_grad(args))

    def hook(module, args, output):
        events.append((False, index[id(module)]))
        grad.setdefault(index[id(module)], _requires_grad(output))

    handles = [m.register_forward_pre_hook(pre_hook) for m in hooked] + [m.register_forward_hook(hook) for m in hooked]
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    trained = [p for p in model.parameters() if p.requires_grad]
    try:
        with counter:
            result = call(model)
        recorded, grad_trained, input_trained = tuple(events), grad, input_grad
        if frozen_too:  # again with the parameters frozen: which outputs and inputs still require grad
            grad, input_grad = {}, {}
            for p in trained:
                p.requires_grad_(False)
            call(model)
    finally:
        for p in trained:
            p.requires_grad_(True)
        for h in handles:
            h.remove()
    direct = tuple(tuple(pindex[id(p)] for p in m.parameters(recurse=False)) for m in modules)
    nested = tuple(tuple(pindex[id(p)] for p in m.parameters()) for m in modules)
    leaf = tuple(id(m) in leaf_ids for m in modules)
    numels = tuple(p.numel() for p in params)
    n = len(modules)
    layout = EngineLayout(
        events=recorded,
        numels=numels,
        persistent=tuple(k <= persistence_threshold for k in numels),
        own=tuple(nested[i] if leaf[i] else direct[i] for i in range(n)),
        direct=direct,
        nested=nested,
        leaf=leaf,
        grad=tuple(grad_trained.get(i, False) for i in range(n)),
        grad_frozen=tuple(grad.get(i, False) for i in range(n)),
        input_grad=tuple(input_trained.get(i, False) for i in range(n)),
        input_grad_frozen=tuple(input_grad.get(i, False) for i in range(n)),
        checkpointed=tuple(index[id(b)] for b in checkpointed),
        trained_numels=tuple(p.numel() for p in trained),
        flops=float(counter.get_total_flops()) if count_flops else 0.0,
    )
    return layout, result


# An action of a pass: ("fetch" | "release", module, forward?, recompute?) or ("leftovers",).
Action = tuple


def forward_actions(layout: EngineLayout) -> list[Action]:
    return [("fetch" if started else "release", m, True, False) for started, m in layout.events]


def backward_actions(layout: EngineLayout, frozen: bool) -> list[Action]:
    """The coordinator's calls in one backward: the forward's events reversed, a module's end
    becoming its gathering (when its output requires grad) and its start its release (when one of
    its inputs does as well; otherwise it stays held). A checkpointed block's forward runs again
    after the block's own gathering. `frozen`: the engine's parameters are frozen (the teacher, the
    heads in the generator step); every backward ends by releasing what it still holds (a trained
    engine's own backward does; the LADD step does it for the frozen ones,
    engines.release_backward_leftovers)."""
    needs = layout.grad_frozen if frozen else layout.grad
    inputs = layout.input_grad_frozen if frozen else layout.input_grad
    span = {}  # checkpointed block -> the index range of its forward's events
    for end, (started, m) in enumerate(layout.events):
        if m in layout.checkpointed and not started:
            span[m] = (first_start(layout.events, m=m, end=end), end)
    out: list[Action] = []
    for started, m in reversed(layout.events):
        if not needs[m]:
            continue
        if not started:
            out.append(("fetch", m, False, False))
            if m in span:
                first, last = span[m]
                out += [("fetch" if s else "release", k, True, True) for s, k in layout.events[first : last + 1]]
        elif inputs[m]:
            out.append(("release", m, False, False))
    out.append(("leftovers",))
    return out


def first_start(events: Sequence[tuple[bool, int]], *, m: int, end: int) -> int:
    """Index of the start event that `events[end]` (the end of module m) closes."""
    depth = 0
    for i in range(end, -1, -1):
        started, k = events[i]
        if k == m:
            depth += -1 if started else 1
            if depth == 0:
                return i
    raise ValueError(f"module {m} ends without a start")


@dataclass
class Replayed:
    """One steady-state step: shard elements gathered over the world and within hpZ groups (per
    rank), and the most elements of non-persistent parameters gathered at once."""

    gathered: float
    within: float
    peak_live: int


def replay(layout: EngineLayout, events: str, *, world: int, zero: dict, steps: int = 3) -> Replayed:
    """The coordinator (module docstring) over `steps` steps of `events` with the
    `zero_optimization` settings `zero`; the last step is returned."""
    return _Coordinator(layout, world=world, zero=zero).run(events, steps)


class _Coordinator:
    def __init__(self, layout: EngineLayout, *, world: int, zero: dict):
        self.layout = layout
        self.hpz = int(zero.get("zero_hpz_partition_size", 1))
        self.prefetch_bucket = float(zero.get("stage3_prefetch_bucket_size", 5e7))
        self.reuse = float(zero.get("stage3_max_reuse_distance", 1e9))
        self.max_live = float(zero.get("stage3_max_live_parameters", 1e9))
        numels = layout.numels
        self.shard = [math.ceil(n / world) for n in numels]
        self.secondary_shard = [math.ceil(n / world) * world / self.hpz for n in numels]
        self.available = {p for p, keep in enumerate(layout.persistent) if keep}
        self.secondary: set[int] = set()
        self.inflight: set[int] = set()  # prefetched, not yet waited for by a use
        self.active: dict[int, set[int]] = collections.defaultdict(set)  # parameter -> modules holding it
        self.recompute: dict[int, set[int]] = collections.defaultdict(set)  # module -> frozen params recomputed under it
        self.backward_held: dict[int, None] = {}  # modules gathered in backward, not yet released (ordered)
        self.release_cache: dict[tuple[int, int], frozenset[int]] = {}  # never cleared, as DeepSpeed's lru_cache
        self.mode, self.trace = "invalid", []
        self.param_trace: list[tuple[int, int]] = []  # (parameter, trace position) in the order DeepSpeed prefetches
        self.queue: collections.deque[tuple[int, int]] = collections.deque()
        self.fetched_for: dict[int, int] = collections.defaultdict(lambda: -(10**10))
        self.step_id = self.n_available = 0
        self.live = 0  # non-persistent elements gathered
        self.peak = 0
        self.gathered = self.within = 0.0

    # -- gathering and releasing single parameters
    def _gather(self, params) -> None:
        new = [p for p in params if p not in self.available]
        for p in new:
            if p in self.secondary:
                self.within += self.secondary_shard[p]
            else:
                self.gathered += self.shard[p]
            self.available.add(p)
            self.n_available += self.layout.numels[p]
            if not self.layout.persistent[p]:
                self.live += self.layout.numels[p]
        self.peak = max(self.peak, self.live)

    def _release(self, p: int) -> None:
        if p in self.available and not self.active[p]:
            self.available.discard(p)
            self.n_available -= self.layout.numels[p]
            if not self.layout.persistent[p]:
                self.live -= self.layout.numels[p]
                if self.hpz > 1:
                    self.secondary.add(p)

    # -- the trace
    def _drop_inflight(self) -> None:
        """What a reset or an invalidated trace does to prefetched parameters no use has waited
        for (`_clean_inflight_param_registry`): wait, then release them."""
        for p in sorted(self.inflight):
            self._release(p)
        self.inflight.clear()

    def _reset(self) -> None:
        self._drop_inflight()
        if self.mode == "record":
            self.mode = "complete"
            self.param_trace = [(p, pos) for pos, m in enumerate(self.trace) for p in sorted(self.layout.own[m])]
        elif self.mode == "invalid":
            self.mode, self.trace = "record", []
        self.queue = collections.deque(self.param_trace) if self.mode == "complete" else collections.deque()
        self.fetched_for = collections.defaultdict(lambda: -(10**10))
        self.step_id = self.n_available = 0

    def _fetch(self, m: int, *, forward: bool, recompute: bool, frozen: bool) -> None:
        if self.mode == "complete" and (self.step_id >= len(self.trace) or self.trace[self.step_id] != m):
            self.mode, self.trace, self.queue = "invalid", [], collections.deque()
            self._drop_inflight()
        elif self.mode == "record":
            self.trace.append(m)
        if not forward:
            self.backward_held[m] = None
        own = self.layout.own[m]
        self._gather(own)
        self.inflight.difference_update(own)
        for p in own:
            self.active[p].add(m)
            if recompute and frozen and self.backward_held:
                holder = next(reversed(self.backward_held))
                self.recompute[holder].add(p)
                self.active[p].add(holder)
        if self.mode == "complete":
            pending = {p for p in own if self.fetched_for[p] < self.step_id}
            popped = 0
            while self.queue and popped < len(pending):
                p, pos = self.queue.popleft()
                self.fetched_for[p] = pos
                popped += 1
            budget, coming, ahead = min(self.max_live - self.n_available, self.prefetch_bucket), 0, []
            while self.queue and coming < budget:
                p, pos = self.queue.popleft()
                fetch = p not in self.available and p not in ahead
                self.fetched_for[p] = max(self.fetched_for[p], pos)
                if fetch:
                    ahead.append(p)
                    coming += self.layout.numels[p]
            self._gather(ahead)
            self.inflight.update(ahead)
        self.step_id += 1

    def _to_release(self, m: int) -> frozenset[int]:
        key = (m, self.step_id)
        if key not in self.release_cache:
            lay = self.layout
            out = {p for p in lay.own[m] if not lay.persistent[p] and self.fetched_for[p] <= self.step_id}
            walked = 0
            for k in self.trace[self.step_id :]:
                if walked >= self.reuse:
                    break
                for p in lay.nested[k] if lay.leaf[m] else lay.direct[k]:
                    out.discard(p)
                    walked += lay.numels[p]
            self.release_cache[key] = frozenset(out)
        return self.release_cache[key]

    def _release_module(self, m: int, *, forward: bool) -> None:
        lay = self.layout
        candidates = set(self._to_release(m)) if self.mode == "complete" else set(lay.own[m])
        params = set(lay.own[m])
        if not forward:
            held = self.recompute.pop(m, set())
            candidates |= {p for p in held if not lay.persistent[p]}
            params |= held
            self.backward_held.pop(m, None)
        for p in params:
            self.active[p].discard(m)
            if p in candidates:
                self._release(p)

    def _leftovers(self) -> None:
        while self.backward_held:
            m = self.backward_held.popitem()[0]
            params = set(self.layout.own[m]) | self.recompute.pop(m, set())
            for p in params:
                self.active[p].discard(m)
                if not self.layout.persistent[p]:
                    self._release(p)

    def _step(self) -> None:
        """A trained engine's optimizer step: everything released, the persistent parameters
        gathered again, the hpZ secondary shards invalid."""
        for p in list(self.available):
            self.active[p].clear()
            self._release(p)
        self.secondary.clear()
        self._gather(p for p, keep in enumerate(self.layout.persistent) if keep)

    def _empty(self) -> None:
        """`empty_partition_cache` (engines.release_frozen): everything released, persistent
        parameters too; in-flight prefetches waited for first."""
        self.inflight.clear()
        for p in list(self.available):
            self.active[p].clear()
            self._release(p)

    def run(self, events: str, steps: int) -> Replayed:
        lay = self.layout
        passes = {"F": forward_actions(lay), "B": backward_actions(lay, False), "b": backward_actions(lay, True)}
        for _ in range(steps):
            self.gathered = self.within = 0.0
            self.peak = self.live
            for event in events:
                if event == "R":
                    self._reset()
                    continue
                if event == "S":
                    self._step()
                    continue
                if event == "E":
                    self._empty()
                    continue
                for action in passes[event]:
                    if action[0] == "leftovers":
                        self._leftovers()
                    elif action[0] == "fetch":
                        self._fetch(action[1], forward=action[2], recompute=action[3], frozen=event == "b")
                    else:
                        self._release_module(action[1], forward=action[2])
        return Replayed(gathered=self.gathered, within=self.within, peak_live=self.peak)
