"""Time the full LADD step (generator + discriminator) on synthetic inputs, on the trainer's
DeepSpeed engines and, in the same run, in plain PyTorch with the same step code.

    python -m evaluation.bench_step --config configs/sd3_medium.yaml       # the production step, one GPU
    python -m evaluation.bench_step --preset tiny --resolution 128 128 --batch 2
    python -m evaluation.bench_step --preset sd3-medium --resolution 1024 1024 --batch 4

With `--config` the step is the run's: model, heads (channels, layers, taps), gradient
checkpointing, compile, EMA, attention backend, precision, micro-batch size, the DeepSpeed
templates and stages, and the shapes the memory plan assumes (the random-latent source's, else
the model's native size with 77 CLIP + text.max_sequence_length T5 tokens); a flag given on the
command line, and every `--set KEY=VALUE`, overrides the config. Without it: the tiny preset at
128x128, 64-channel heads, no checkpointing, and on a GPU the SD3 GPU templates (ds_configs/gpu/).

For each engine kind (`--engines plain,deepspeed`, the default) it prints the median step time,
img/s, the step's FLOPs (torch.utils.flop_counter, forward + backward of every model), the achieved
TFLOP/s and its ratio to a square matrix product timed in the same run at the same precision (bf16
on GPU, fp32 on CPU), and peak memory; then the engine step's time over the plain one; on a GPU
also the peak memory of every phase (forward, backward and optimizer step of each engine) and,
for the engines, the memory plan's bytes per device next to it. `--attention-backends` times the
same built models once per scaled-dot-product-attention backend (models/attention.py).

The plain reference (`PlainEngine`) runs `LADDSteps` unchanged on bare modules: student and heads
in fp32 with AdamW (fused on a GPU) and gradient clipping, each forward in its own bf16 autocast
region when the precision is bf16; the frozen teacher in the training precision. The DeepSpeed
engines are the trainer's own, once per placement of `--placements` (default `auto`: the memory
plan's stages, as `deepspeed.*_stage: auto` picks them; `config`: the config's stages; a number N:
student and heads at ZeRO-N (heads at most 2), the teacher at ZeRO-3 for N = 3 and replicated
otherwise; a `:no-overlap` suffix turns zero_optimization.overlap_comm off in every engine). The
EMA update is part of the step when the config keeps one (optim.ema_decay > 0). One process; each
run's models are freed before the next ones are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ladd_ds.config import load_config
from ladd_ds.distributed import engines as ds
from ladd_ds.ladd.build import build_models, place_ladd_engines
from ladd_ds.ladd.engines import Engines, build_engines
from ladd_ds.ladd.steps import LADDSteps
from ladd_ds.models.attention import PRIORITIES, sdpa_context, sdpa_priority
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.training.build import planned_shapes, training_dtype
from ladd_ds.training.ema import ShardedEMA

VAE_FACTOR = 8  # SD3 VAE: 8x spatial downsampling
ENGINE_KINDS = ("plain", "deepspeed")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PlainEngine:
    """The calls `LADDSteps` makes on a DeepSpeed engine, on a bare module: the reference the
    engine step is measured against. With `lr`, backward/step train it as the trainer's engines do
    (AdamW, the learning-rate warm-up, gradient clipping); without, it is a frozen model."""

    def __init__(self, module: torch.nn.Module, lr: float | None = None, optim_cfg=None, grad_clip: float = 0.0):
        self.module = module
        self.grad_clip = grad_clip
        if lr is not None:
            self.optimizer = ds.adamw(module, lr, optim_cfg)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, ds.linear_warmup(optim_cfg.warmup_steps))

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return True

    def zero_optimization_partition_weights(self) -> bool:
        return False  # nothing partitioned: engines.release_frozen and release_backward_leftovers do nothing


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product: the machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def synthetic_batch(model_cfg: dict, batch: int, latent_hw: tuple[int, int], text_len: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = latent_hw
    out = {
        "latent": torch.randn(batch, model_cfg["in_channels"], h, w, generator=g),  # (B, C, h, w)
        "prompt_embeds": torch.randn(batch, text_len, model_cfg["joint_attention_dim"], generator=g),  # (B, L, D)
        "pooled": torch.randn(batch, model_cfg["pooled_projection_dim"], generator=g),  # (B, P)
    }
    out = {k: v.to(device=device, dtype=dtype) for k, v in out.items()}
    out["sample_id"] = torch.arange(batch)
    return out


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS


BUILTIN = {
    "preset": "tiny",
    "batch": 2,
    "head_channels": 64,
    "grad_checkpointing": False,
    "compile": False,
    "z3_leaf_blocks": False,
}


def bench_config(args):
    """The run config the step is built from: `--config` (or the built-in defaults) with the flags
    given on the command line, then every --set, on top. The synthetic batch replaces the data."""
    given = {k: getattr(args, k) for k in BUILTIN if getattr(args, k) is not None}
    data = []
    if args.config is None:
        given = {**BUILTIN, **given}
        precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
        data = ["data.source=random_latents"]  # the defaults' mds source needs a data.path
    else:
        precision = args.precision
    keys = {
        "preset": "model.teacher",
        "batch": "data.micro_batch_size",
        "head_channels": "discriminator.hidden_channels",
        "grad_checkpointing": "model.gradient_checkpointing",
        "compile": "model.compile",
        "z3_leaf_blocks": "deepspeed.z3_leaf_blocks",
    }
    overrides = [f"{keys[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in given.items()]
    if precision is not None:
        overrides.append(f"deepspeed.precision={precision}")
    if args.taps is not None:
        overrides.append(f"discriminator.taps={args.taps}")
    if args.config is None and torch.cuda.is_available():  # overlapped communication, fp32 reduction (ds_configs/gpu/)
        template = "ds_configs/gpu/sd3_large.json" if given["preset"] == "sd3-large" else "ds_configs/gpu/sd3_medium.json"
        overrides += [f"deepspeed.{name}_config={template}" for name in ("student", "teacher")]
        overrides.append("deepspeed.heads_config=ds_configs/gpu/heads.json")
    return load_config(args.config, [*data, *overrides, *args.set])


def step_shapes(args, cfg) -> tuple[int, int, int]:
    """(latent height, latent width, text tokens): the flags', else with --config the memory
    plan's (training.build.planned_shapes), else 128x128 pixels and SD3's 333 or 8 tokens."""
    model_cfg = resolve_model_config(cfg.model.teacher)
    if args.config is not None:
        h, w, text, _ = planned_shapes(cfg, model_cfg)
    else:
        h = w = 128 // VAE_FACTOR
        text = 333 if model_cfg["joint_attention_dim"] == 4096 else 8  # SD3: 77 CLIP + 256 T5
    if args.resolution is not None:
        h, w = args.resolution[0] // VAE_FACTOR, args.resolution[1] // VAE_FACTOR
    return h, w, args.text_len or text


def autocast_forward(module: torch.nn.Module, device_type: str) -> None:
    """Run each of `module`'s forwards in its own bf16 autocast region (as accelerate's
    prepare_model wraps model.forward). One region around several steps would keep serving the
    bf16 copies of the weights it cast before the optimizer updated them: autocast caches the
    casts of leaf tensors that require grad until its outermost region exits."""
    module.forward = torch.autocast(device_type, dtype=torch.bfloat16)(module.forward)


def student_ema(cfg, student: torch.nn.Module) -> ShardedEMA | None:
    """The EMA the trainer keeps of the student (ladd/method.py), so its update is in the step."""
    return ShardedEMA(student, cfg.optim.ema_decay, cfg.optim.ema_every) if cfg.optim.ema_decay > 0 else None


def build_plain_steps(cfg) -> LADDSteps:
    """LADDSteps on PlainEngines: the models built as the trainer builds them, moved to the device
    (the frozen teacher in the training dtype)."""
    device = ds.device()
    teacher, student, heads, taps = build_models(cfg)
    dtype = training_dtype(cfg)
    teacher.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if dtype == torch.bfloat16:  # student and heads stay fp32: mixed precision by autocast
        for module in (student, heads, teacher):
            autocast_forward(module, device.type)
    optim = cfg.optim
    engines = Engines(
        student=PlainEngine(student.to(device), optim.student_lr, optim, optim.grad_clip),
        heads=PlainEngine(heads.to(device), optim.heads_lr, optim, optim.grad_clip),
        teacher=PlainEngine(teacher),
        ds_configs={},
    )
    return LADDSteps(cfg, engines, taps=taps, device=device, ema=student_ema(cfg, engines.student.module))


PLACEMENTS = ("auto", "config", "0", "1", "2", "3")
NO_OVERLAP = ":no-overlap"


def check_placements(placements: list[str]) -> None:
    bad = [p for p in placements if p.removesuffix(NO_OVERLAP) not in PLACEMENTS]
    if bad:
        raise SystemExit(f"--placements: {bad} unknown; choose from {', '.join(PLACEMENTS)}, each optionally with {NO_OVERLAP}")


def placement_config(cfg, placement: str):
    """`cfg` with the engines' stages of one --placements entry (its :no-overlap suffix aside)."""
    placement = placement.removesuffix(NO_OVERLAP)
    if placement == "config":
        return cfg
    if placement == "auto":
        stages = {"student_stage": "auto", "heads_stage": "auto", "teacher_stage": "auto"}
    else:
        n = int(placement)
        stages = {"student_stage": n, "heads_stage": min(n, 2), "teacher_stage": 3 if n == 3 else 0}
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, **stages))


def build_deepspeed_steps(cfg, placement: str = "config") -> tuple[LADDSteps, object]:
    """The trainer's engines for one --placements entry, and the memory plan of that placement."""
    cfg = placement_config(cfg, placement)
    ds_configs, plan = place_ladd_engines(cfg, 1, plan_always=True)
    if placement.endswith(NO_OVERLAP):
        for c in ds_configs.values():
            c.setdefault("zero_optimization", {})["overlap_comm"] = False
    teacher, student, heads, taps = build_models(cfg, ds_configs=ds_configs)
    engines = build_engines(student, teacher, heads, ds_configs, cfg.optim, leaf_blocks=cfg.deepspeed.z3_leaf_blocks)
    return LADDSteps(cfg, engines, taps=taps, device=ds.device(), ema=student_ema(cfg, engines.student.module)), plan


def planned_gib(plan) -> dict:
    """The memory plan's bytes per device (training/placement.py): each engine's, the step's
    activations, their sum."""
    return {
        "engines": {name: m.total / 2**30 for name, m in plan.memory.items()},
        "activations": plan.activations / 2**30,
        "total": plan.total / 2**30,
    }


class PhaseMemory:
    """Peak device memory of each phase of a step: every engine's forward, backward and optimizer
    step, recorded around the calls LADDSteps makes (CUDA only: the CPU allocator keeps no peak)."""

    def __init__(self, engines: Engines):
        self.peaks: dict[str, float] = {}
        for name in ("student", "teacher", "heads"):
            engine = getattr(engines, name)
            self._wrap(engine.module, "forward", f"{name} forward")
            if name != "teacher":
                self._wrap(engine, "backward", f"{name} backward")
                self._wrap(engine, "step", f"{name} step")

    def _wrap(self, obj, attr: str, phase: str) -> None:
        original = getattr(obj, attr)

        def recorded(*args, **kwargs):
            torch.cuda.reset_peak_memory_stats()
            out = original(*args, **kwargs)
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)
            return out

        setattr(obj, attr, recorded)


def time_steps(steps: LADDSteps, batch: dict, args, backend: str) -> dict:
    """Median step time after warm-up, the FLOPs of one more step, and peak memory; every step
    under the attention backend `backend` (models/attention.py)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with sdpa_context(sdpa_priority(backend, cuda=torch.cuda.is_available())):
        for i in range(args.warmup):
            steps.train_step([batch], i)
        _sync()
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            steps.train_step([batch], args.warmup + i)
            _sync()
            times.append(time.perf_counter() - start)
        with FlopCounterMode(display=False) as counter:
            steps.train_step([batch], args.warmup + args.steps)
        peak = peak_memory_gib()
        phases = None
        if torch.cuda.is_available():  # one more step, recorded phase by phase (not timed)
            recorder = PhaseMemory(steps.engines)
            steps.train_step([batch], args.warmup + args.steps + 1)
            phases = recorder.peaks
    step_s = statistics.median(times)
    return {
        "step_s_median": step_s,
        "step_s_all": times,
        "img_per_s": batch["latent"].shape[0] / step_s,
        "tflop_per_step": counter.get_total_flops() / 1e12,
        "achieved_tflop_s": counter.get_total_flops() / step_s / 1e12,
        "peak_memory_gib": peak,
        "phase_peak_memory_gib": phases,
        "attention_backend": backend,
    }


def run(args) -> dict:
    kinds = args.engines.split(",")
    unknown = sorted(set(kinds) - set(ENGINE_KINDS))
    if unknown or not kinds:
        raise SystemExit(f"--engines {args.engines}: choose from {', '.join(ENGINE_KINDS)}")
    placements = args.placements.split(",")
    check_placements(placements)
    ds.init_distributed()
    cfg = bench_config(args)
    backends = args.attention_backends.split(",") if args.attention_backends else [cfg.model.attention_backend]
    if set(backends) - set(PRIORITIES):
        raise SystemExit(f"--attention-backends {args.attention_backends}: choose from {', '.join(PRIORITIES)}")
    model_cfg = resolve_model_config(cfg.model.teacher)
    h, w, text_len = step_shapes(args, cfg)
    # The memory plan of the engines (`auto`, and the printed plan) for the shapes timed here.
    shapes = dataclasses.replace(cfg.data.random_latents, height=h, width=w, text_len=text_len)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="random_latents", random_latents=shapes))
    patch = model_cfg["patch_size"]
    if h % patch or w % patch:
        raise SystemExit(
            f"resolution {h * VAE_FACTOR}x{w * VAE_FACTOR}: must be divisible by {VAE_FACTOR * patch} (VAE factor x patch size)"
        )
    dtype = training_dtype(cfg)
    device = ds.device()
    batch = synthetic_batch(model_cfg, cfg.data.micro_batch_size, (h, w), text_len, device, dtype)

    runs = {}
    taps = None
    jobs = [("plain", None)] if "plain" in kinds else []
    jobs += [(f"deepspeed:{p}", p) for p in placements] if "deepspeed" in kinds else []
    for key, placement in jobs:
        if placement is None:
            steps, described, extra = build_plain_steps(cfg), "plain PyTorch", {}
        else:
            steps, plan = build_deepspeed_steps(cfg, placement)
            stages = {name: ds.zero_stage(c) for name, c in steps.engines.ds_configs.items()}
            described = f"{placement}: ZeRO student {stages['student']}, heads {stages['heads']}, teacher {stages['teacher']}"
            extra = {"stages": stages, "planned_memory_gib": planned_gib(plan)}
        for backend in backends:
            name = key if len(backends) == 1 else f"{key}@{backend}"
            runs[name] = {**time_steps(steps, batch, args, backend), "placement": described, **extra}
        taps = len(steps.taps)
        del steps
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    peak = matmul_tflops(dtype, device, args.matmul_size or (8192 if torch.cuda.is_available() else 1024))
    for r in runs.values():
        r["ratio_to_matmul"] = r["achieved_tflop_s"] / peak
    result = {
        "config": args.config,
        "preset": cfg.model.teacher,
        "resolution": [h * VAE_FACTOR, w * VAE_FACTOR],
        "latent": [model_cfg["in_channels"], h, w],
        "text_tokens": text_len,
        "batch": cfg.data.micro_batch_size,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "compile": cfg.model.compile,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "head_channels": cfg.discriminator.hidden_channels,
        "ema": cfg.optim.ema_decay > 0,
        "heads": taps,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "matmul_tflop_s": peak,
        "peak_memory_kind": "cuda max_allocated" if torch.cuda.is_available() else "process max RSS (whole run so far)",
        "runs": runs,
    }
    plain_keys = [k for k in runs if k.split("@")[0] == "plain"]
    if plain_keys:
        plain = runs[plain_keys[0]]["step_s_median"]
        result["engine_over_plain"] = {k: r["step_s_median"] / plain for k, r in runs.items() if k not in plain_keys}
    return result


def format_report(r: dict) -> str:
    lines = [
        f"LADD step (G + D, {r['heads']} heads of {r['head_channels']} channels): {r['preset']} at "
        f"{r['resolution'][0]}x{r['resolution'][1]} (latent {r['latent']}, {r['text_tokens']} text tokens), "
        f"batch {r['batch']}, {r['precision']}{', compiled blocks' if r['compile'] else ''}"
        f"{', checkpointing' if r['gradient_checkpointing'] else ''}{', EMA' if r['ema'] else ''}, {r['device']}; "
        f"matmul in the same run: {r['matmul_tflop_s']:.4f} TFLOP/s"
    ]
    for kind, run in r["runs"].items():
        lines += [
            f"  {kind} ({run['placement']}):",
            f"    step time (median of {len(run['step_s_all'])}): {run['step_s_median'] * 1000:.1f} ms  ->  "
            f"{run['img_per_s']:.2f} img/s",
            f"    FLOPs per step: {run['tflop_per_step']:.4f} TFLOP  ->  {run['achieved_tflop_s']:.4f} TFLOP/s  "
            f"({run['ratio_to_matmul']:.1%} of the matmul)",
            f"    peak memory: {run['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})",
        ]
        if run["phase_peak_memory_gib"]:
            phases = ", ".join(f"{phase} {gib:.2f}" for phase, gib in run["phase_peak_memory_gib"].items())
            lines.append(f"    peak memory per phase (GiB): {phases}")
        if "planned_memory_gib" in run:
            p = run["planned_memory_gib"]
            engines = " + ".join(f"{name} {gib:.2f}" for name, gib in p["engines"].items())
            lines.append(f"    memory plan (GiB): {engines} + activations {p['activations']:.2f} = {p['total']:.2f}")
    for key, ratio in r.get("engine_over_plain", {}).items():
        lines.append(f"  engine step ({key}) / plain step: {ratio:.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="the run config whose step is timed (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--preset", default=None, help="model.teacher (default: the config's, else tiny)")
    p.add_argument(
        "--resolution", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="image pixels (latent = /8); default: the config's planned shapes, else 128 128",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the config's, else 2)")
    p.add_argument("--engines", default="plain,deepspeed", help="which steps to time, in this order: plain, deepspeed or both")
    p.add_argument(
        "--placements",
        default="auto",
        help="engine placements to time, comma-separated: auto (the memory plan's stages), config (the config's), or 0-3; "
        "each optionally with :no-overlap (zero_optimization.overlap_comm off)",
    )
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: the config's, else bf16 on GPU and fp32 on CPU"
    )
    p.add_argument(
        "--attention-backends", default=None,
        help=f"comma-separated, each timed on the same models: {', '.join(PRIORITIES)} (default: the config's)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--taps", default=None, help="YAML list of blocks, e.g. '[23]'; default: every block")
    p.add_argument("--head-channels", type=int, default=None, help="default: the config's, else 64")
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument(
        "--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="default: the config's, else off"
    )
    p.add_argument(
        "--z3-leaf-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ZeRO-3 engines gather whole blocks (deepspeed.z3_leaf_blocks); default: the config's, else off",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.compile in both steps (the engines need stages below 3: --placements auto on one rank, or 0-2); "
        "default: the config's, else off",
    )
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
