"""DeepSpeed wiring: process group, config templates, engines with and without an optimizer,
ZeRO-3 helpers and checkpoint readers; each method puts its own engines together from these
(ladd/engines.py, dpo/engines.py).

This is the only module of ladd_ds that imports deepspeed. docs/method.md, section 7 records the
behaviour the layout below depends on (checked with deepspeed 0.19.8, CPU + gloo).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.distributed.flat import MASTER_CHUNK_ELEMENTS, chunks_by_elements, read_flat_range
from ladd_ds.distributed.launch_env import launcher_env, network_env
from ladd_ds.distributed.ranks import prepare_launcher_env, print0
from ladd_ds.distributed.zero_sizes import AUTO, AUTO_KEYS, has_auto_sizes

REPO_ROOT = Path(__file__).resolve().parents[2]

prepare_launcher_env()  # before `import deepspeed`: it picks its accelerator at import time
import deepspeed  # noqa: E402
from deepspeed.utils import groups  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Join the process group. Ranks started by mpirun or srun without RANK take their rank from
    that launcher (launch_env.launcher_env); a plain `python -m ladd_ds` run becomes a world of one.

    `timeout_s` bounds every collective: a rank that died leaves the others waiting at most that
    long before they raise and the launcher ends the job.
    """
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(launcher_env(os.environ))
        if os.environ["WORLD_SIZE"] == "1":
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    network = network_env(os.environ)
    if network:
        print0("network: " + " ".join(f"{k}={v}" for k, v in network.items()))
    if not torch.cuda.is_available():
        atexit.register(_remove_shm_buffers, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"])


def _remove_shm_buffers(addr: str, port: str, rank: str) -> None:
    """DeepSpeed's CPU comm op creates /dev/shm/deepspeed_allreduce_buffer_<i>_<addr>_<port>_<rank>
    (~66 MB each) and never unlinks them; runs pile up until /dev/shm fills the machine's memory.
    Each rank removes its own at exit (a name can be unlinked while other ranks still map it)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_template(path: str) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    return p


def load_template(path: str, key: str) -> dict:
    p = resolve_template(path)
    if not p.is_file():
        raise MissingInputError(f"{key}: DeepSpeed config template {path} not found (looked at {p})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{key}: {p} is not valid JSON: {e}") from None


def fill_ds_config(
    template: dict,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    precision: str,
    grad_clip: float = 0.0,
    stage: int | None = None,
    trainable: bool = True,
) -> dict:
    """The one function that puts run-config values into a DeepSpeed JSON template: batch sizes,
    precision, clipping, and the ZeRO stage when the run config sets one (`stage`).

    fp32 gradient accumulation (`data_types.grad_accum_dtype`) is dropped where DeepSpeed 0.19.8
    has none: a bf16 ZeRO-0 engine raises on it, and a frozen engine has no gradients.
    """
    cfg = json.loads(json.dumps(template))  # deep copy
    if stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = stage
    if zero_stage(cfg) < 3:
        # ZeRO-3's gather sizes mean nothing below it; "auto" ones are resolved from the model
        # (zero_sizes.resolve_zero3_sizes) only where they apply, and DeepSpeed refuses the word.
        zero = cfg.get("zero_optimization", {})
        for key in [k for k in AUTO_KEYS if zero.get(k) == AUTO]:
            del zero[key]
    if not trainable or zero_stage(cfg) == 0:
        cfg.get("data_types", {}).pop("grad_accum_dtype", None)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * world_size
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg.setdefault("fp16", {"enabled": False})
    # Written either way: a missing key is DeepSpeed 0.19.8's default, clipping at 1.0
    # (runtime/constants.py GRADIENT_CLIPPING_DEFAULT), not "off".
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip > 0 else 0.0
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def release_backward_leftovers(engine) -> None:
    """Release what a backward that ran through a ZeRO-3 engine but was not its own (the frozen
    teacher's, the heads' in the generator step) left gathered: DeepSpeed releases a module after
    its inputs' gradients are computed, so one whose inputs need none (the adaLN linears, fed the
    time embedding) stays gathered until the engine's own backward ends, which a frozen engine
    never has (docs/performance.md, "ZeRO-3 live parameters")."""
    if engine.zero_optimization_partition_weights():
        offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
        offload.release_backward_leftovers()


def release_frozen(engine) -> None:
    """Release every parameter a frozen ZeRO-3 engine holds gathered, at the end of a training
    step. Without an optimizer step nothing else does, and DeepSpeed's count of gathered
    parameters restarts from 0 at every top-level forward while they stay gathered: the count
    goes below 0 as they are released, and `stage3_max_live_parameters` stops capping the
    prefetch (the SD3-medium teacher held 4.7 blocks instead of about 2; docs/performance.md,
    "ZeRO-3 live parameters")."""
    if engine.zero_optimization_partition_weights():
        engine.empty_partition_cache()


def device_memory_bytes() -> float:
    """Memory of this rank's device: the GPU's, or on CPU ranks the host's shared by the ranks of
    the node (what `auto` placement plans against when deepspeed.device_memory_gib is not set)."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def linear_warmup(warmup_steps: int):
    """LR factor schedule: linear warm-up over `warmup_steps` optimizer steps, then constant."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def check_resolved(ds_config: dict) -> None:
    """DeepSpeed validates its config as integers: an unresolved "auto" is a bug of the caller."""
    if has_auto_sizes(ds_config):
        raise ValueError(
            f'zero_optimization {list(AUTO_KEYS)}: resolve "auto" from the model first '
            "(ladd_ds.distributed.zero_sizes.resolve_zero3_sizes)"
        )


def partitioned_init(ds_config: dict):
    """Context that builds modules partitioned over the ranks when the engine uses ZeRO-3, so no
    rank ever holds a full copy of an 8B model (deepspeed.zero.Init); a no-op below stage 3."""
    if zero_stage(ds_config) < 3:
        return contextlib.nullcontext()
    check_resolved(ds_config)
    # ZeRO++ hpZ (zero_hpz_partition_size > 1): zero.Init creates the intra-node parameter group
    # when it is given none and asserts that it did not exist (deepspeed 0.19.8, utils/groups.py
    # _create_zero_param_parallel_group), so the second hpZ engine of a run passes the first's.
    # Only an hpZ engine: given the group, zero.Init keeps secondary shards whatever the config says.

    hpz = int(ds_config["zero_optimization"].get("zero_hpz_partition_size", 1)) > 1
    group = groups._get_zero_param_intra_parallel_group() if hpz else None
    return deepspeed.zero.Init(config_dict_or_path=ds_config, zero_param_parallel_group=group)


def load_partitioned_weights(module: nn.Module, names: dict[str, Path], read_tensor, source: str, adapt=None) -> None:
    """Load named tensors into a module built under zero.Init, one parameter at a time.
    `adapt(name, tensor, shape)`: what a stored tensor becomes in a parameter of `shape` (a text-to-
    image weight in a widened model, models/conditioning.widen_weight).

    Rank 0 reads each tensor from disk and writes it into the gathered parameter; DeepSpeed
    re-partitions it on exit from GatheredParameters. Other ranks read only buffers, so peak host
    memory per rank is its partition plus (rank 0) the largest single tensor.
    """
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    unexpected = sorted(set(names) - set(params) - set(buffers))
    missing = sorted(set(params) - set(names))
    if unexpected or missing:
        raise InputError(f"{source}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    is_rank0 = torch.distributed.get_rank() == 0
    for name, path in names.items():
        if name in buffers:
            buffers[name].copy_(read_tensor(path, name))
            continue
        param = params[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_rank0:
                tensor = read_tensor(path, name)
                tensor = tensor if adapt is None else adapt(name, tensor, param.shape)
                if tensor.shape != param.shape:
                    raise InputError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
                param.data.copy_(tensor)


def adamw_kind() -> str:
    """The torch AdamW implementation `adamw` runs (the memory plan counts its temporaries): the
    fused kernel on a GPU, else torch's default, the for-loop one (torch has no foreach kernels
    for CPU tensors)."""
    return "fused" if torch.cuda.is_available() else "for-loop"


def adamw(model: nn.Module, lr: float, optim_cfg) -> torch.optim.AdamW:
    """Torch AdamW over the model's trainable parameters with the optim section's settings; on a
    GPU its fused kernel (docs/method.md section 7: the engines' optimizer step with the default
    AdamW measured 5-9x a fused AdamW step on an H200)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=adamw_kind() == "fused",
    )


class MasterWeightAdamW(torch.optim.AdamW):
    """Fused AdamW on fp32 master copies of bf16 parameters: what a bf16 ZeRO-0 engine steps with.

    DeepSpeed 0.19.8 wraps any non-DeepSpeed optimizer of a bf16 ZeRO-0 engine in
    FP16_UnfusedOptimizer (engine.py `_configure_fp16_optimizer`): an inf/NaN check that reads
    every gradient back to the host one parameter at a time, and a per-parameter AdamW. This
    class computes what that wrapper computes, with one fused kernel per chunk and no host read:
    bf16 weights and gradients (a parameter without a gradient steps on zeros, as there), fp32
    master weights and moments (the 12 B per trained parameter of the memory plan), the gradient
    norm over the bf16 gradients, clipping to `grad_clip` by dividing the gradients by
    max(1, (norm + 1e-6) / grad_clip), and no update at all when the norm is not finite.
    Clipping and the skip run on the device (the fused kernel's `grad_scale` and `found_inf`);
    `overflow` reads the flag when DeepSpeed asks for it after the step, once per step, as
    ZeRO-1/2/3's own overflow check does.

    The master gradients exist for `chunk_elements` parameters at a time (4 B each), so the
    step's transient memory is bounded instead of a second fp32 copy of every gradient. The
    state dict has FP16_UnfusedOptimizer's layout, so checkpoints move between the two.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        grad_clip: float = 0.0,
        chunk_elements: int = MASTER_CHUNK_ELEMENTS,
    ):
        self.model_params = list(params)
        masters = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        super().__init__(masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.grad_clip, self.chunk_elements = grad_clip, chunk_elements
        self.found_inf: torch.Tensor | None = None  # read by the fused kernel: 1.0 skips the update
        self.grad_scale: torch.Tensor | None = None  # read by the fused kernel: gradients are divided by it
        self._global_grad_norm: torch.Tensor | None = None  # DeepSpeed's engine reports it (get_global_grad_norm)
        self.steps = 0

    @property
    def overflow(self) -> bool:
        """Whether the last step was skipped (DeepSpeed's engine reads it after each step)."""
        return self.found_inf is not None and bool(self.found_inf)

    def _chunks(self) -> list[list[int]]:
        return chunks_by_elements([p.numel() for p in self.model_params], self.chunk_elements)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.model_params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        self._global_grad_norm = norm
        self.found_inf = (~torch.isfinite(norm)).float()
        self.grad_scale = None
        if self.grad_clip > 0:
            self.grad_scale = torch.clamp((norm + 1e-6) / self.grad_clip, min=1.0)
        masters = self.param_groups[0]["params"]
        for chunk in self._chunks():
            for i in chunk:
                masters[i].grad = grads[i].float()
            super().step()
            for i in chunk:
                masters[i].grad = None
            torch._foreach_copy_([self.model_params[i] for i in chunk], [masters[i] for i in chunk])
        self.steps += 1
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict:
        # FP16_UnfusedOptimizer's keys (deepspeed/runtime/fp16/unfused_optimizer.py): a run resumes
        # across this change in either direction.
        masters = [p.detach() for p in self.param_groups[0]["params"]]
        return {
            "dynamic_loss_scale": False,
            "cur_scale": 1.0,
            "cur_iter": self.steps,
            "optimizer_state_dict": super().state_dict(),
            "fp32_groups": [masters],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [t for group in state_dict["fp32_groups"] for t in group]
        masters = self.param_groups[0]["params"]
        if [t.shape for t in saved] != [p.shape for p in masters]:
            raise InputError("optimizer state: the saved fp32 master weights do not match the model's trained parameters")
        super().load_state_dict(state_dict["optimizer_state_dict"])
        with torch.no_grad():
            for master, t in zip(self.param_groups[0]["params"], saved):
                master.copy_(t)
        self.steps = int(state_dict.get("cur_iter", 0))


def uses_master_weight_adamw(ds_config: dict) -> bool:
    """bf16 at ZeRO-0: the engine steps with MasterWeightAdamW instead of DeepSpeed's unfused wrapper."""
    return zero_stage(ds_config) == 0 and bool(ds_config.get("bf16", {}).get("enabled"))


def trainable_engine(model: nn.Module, ds_config: dict, lr: float, optim_cfg) -> Any:
    """A DeepSpeed engine with a torch AdamW as client optimizer (DeepSpeed's own optimizers
    JIT-compile ops, slow on CPU).

    bf16 at ZeRO-0: the model's parameters are cast to bf16 here and step with MasterWeightAdamW;
    DeepSpeed gets the config with bf16 off and gradient_clipping 0, so it neither wraps nor clips
    (the optimizer clips; DeepSpeed's own fp32 clipping all-reduces the norm). One rank at ZeRO-0
    runs no gradient all-reduce: DeepSpeed's buffered_allreduce_fallback otherwise flattens,
    casts to fp32, all-reduces over one rank and copies back after every backward.
    """
    check_resolved(ds_config)
    schedule = linear_warmup(optim_cfg.warmup_steps)
    hyper = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if uses_master_weight_adamw(ds_config):
        # The cast DeepSpeed's bf16 engine makes (engine.py `_cast_module_mixed_precision`):
        # floating-point parameters to bf16, buffers as they are; the masters start from it.
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = MasterWeightAdamW(trained, **hyper, grad_clip=float(ds_config.get("gradient_clipping", 0.0)))
        ds_config = {**ds_config, "gradient_clipping": 0.0, "bf16": {"enabled": False}}
        # Several ZeRO-0 ranks reduce in bf16 as a bf16 engine does, unless the template says otherwise.
        ds_config.setdefault("communication_data_type", "bf16")
    else:
        optimizer = adamw(model, lr, optim_cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    if zero_stage(ds_config) == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine


def partition_ranges(engine) -> dict[str, tuple[int, int]] | None:
    """For an engine at ZeRO-1/2: [start, stop) of each trained parameter's flattened elements
    that this rank's fp32 optimizer partition holds (start == stop where other ranks hold all of
    it). DeepSpeed's ZeRO-1/2 optimizer links each bit16 parameter to its fragment of the
    partition (`param._hp_mapping`, stage_1_and_2.py `_link_all_hp_params`; None where the
    partition holds none of it). None at other stages: ZeRO-3 partitions the parameters themselves
    (`param.ds_tensor`), ZeRO-0 nothing."""
    if engine.zero_optimization_stage() not in (1, 2):
        return None
    ranges = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            fragment = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
            ranges[name] = (fragment.start, fragment.start + fragment.numel) if fragment else (0, 0)
    return ranges


def frozen_engine(model: nn.Module, ds_config: dict):
    """An optimizer-less engine: ZeRO's partitioning and gathering for a frozen model."""
    check_resolved(ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def set_leaf_blocks(model: nn.Module, ds_config: dict) -> None:
    """Under ZeRO-3, make each of `model.blocks` a DeepSpeed leaf module: its weights are gathered
    in one coalesced all-gather when it starts and released after it, its submodules get no hooks
    of their own (SD3-medium: one gather for each of its 24 blocks instead of one for each of the
    blocks' 333 submodules with weights).
    Before deepspeed.initialize, which registers the hooks. The model calls its blocks with
    positional inputs (models/flow_model.py says why)."""
    if zero_stage(ds_config) >= 3:
        kinds = {type(b) for b in model.blocks}
        deepspeed.utils.set_z3_leaf_modules(model, sorted(kinds, key=lambda k: k.__qualname__))


def consolidate_zero_checkpoint(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of one engine from its (ZeRO-1/2/3, any world size) checkpoint,
    on one CPU process, with DeepSpeed's own zero_to_fp32 tool."""

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def lazy_zero_checkpoint(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """One engine's full fp32 parameters (and buffers), each produced on demand (`.contiguous()`),
    from a ZeRO-1/2/3 checkpoint of any world size, holding no full copy of the model.

    ZeRO-3: DeepSpeed's zero_to_fp32 in lazy mode, which gathers a parameter from every rank's fp32
    partition when asked for (the optimizer files memory-mapped, their Adam moments dropped).
    ZeRO-1/2, where that tool concatenates the partitions into a full fp32 copy first: a
    parameter is read from the memory-mapped slices of the ranks' flat fp32 groups that cover it
    (zero12_sources). Frozen parameters come as the model-state file stores them."""
    ds_dir = Path(checkpoint_dir) / tag
    optim_files = sorted(ds_dir.glob("*_optim_states.pt"), key=lambda f: int(re.search(r"rank_(\d+)_", f.name)[1]))
    if optim_files:
        first = torch.load(optim_files[0], map_location="cpu", mmap=True, weights_only=False)
        if first["optimizer_state_dict"].get("zero_stage", 3) <= 2:
            return zero12_sources(ds_dir, optim_files)

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)


class _Slice:
    """A parameter of a ZeRO-1/2 checkpoint, read from the partitions covering it when asked for."""

    def __init__(self, partitions: list[torch.Tensor], start: int, shape: torch.Size):
        self.partitions, self.start, self.shape = partitions, start, torch.Size(shape)

    def contiguous(self) -> torch.Tensor:
        numel, total = self.shape.numel(), self.partitions[0].numel() * len(self.partitions)
        return read_flat_range(self.partitions, numel=total, start=self.start, stop=self.start + numel).view(self.shape).clone()


def zero12_sources(ds_dir: Path, optim_files: list[Path]) -> dict[str, Any]:
    """Below ZeRO-3, each param group's parameters lie back to back in one flat fp32 vector (each
    followed by its alignment padding, when the checkpoint records one), padded and split into one
    equal slice per rank; rank r's optimizer file holds slice r of every group. Those files and
    rank 0's model-state file (shapes, buffers, frozen parameters) are memory-mapped: a
    parameter's bytes are read when it is asked for."""
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    groups = [s["single_partition_of_fp32_groups"] for s in states]
    paddings = states[0].get("param_alignment_paddings")
    model = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
    out: dict[str, Any] = {
        k: v.float() if v.is_floating_point() else v for k, v in model["module"].items() if k in model["buffer_names"]
    }
    out.update(model.get("frozen_param_fragments") or {})
    for g, shapes in enumerate(model["param_shapes"]):
        partitions, offset = [ranks_groups[g] for ranks_groups in groups], 0
        if len({p.numel() for p in partitions}) != 1:
            raise InputError(
                f"{ds_dir}: the ranks' fp32 partitions of param group {g} differ in size; "
                "not a ZeRO-1/2 checkpoint this reader knows"
            )
        for i, (name, shape) in enumerate(shapes.items()):
            out[name] = _Slice(partitions, offset, shape)
            offset += torch.Size(shape).numel() + (paddings[g][i] if paddings is not None else 0)
        if offset > partitions[0].numel() * len(partitions):
            raise InputError(f"{ds_dir}: param group {g} lists {offset} elements, its partitions hold fewer")
    for alias, target in (model.get("shared_params") or {}).items():
        if target in out:
            out[alias] = out[target]
    return out
