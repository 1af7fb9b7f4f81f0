"""Time the full LADD step (generator + discriminator) on synthetic inputs, on the trainer's
DeepSpeed engines and, in the same run, in plain PyTorch with the same step code.

    python -m evaluation.bench_step --preset tiny --resolution 128 128 --batch 2
    python -m evaluation.bench_step --preset sd3-medium --resolution 1024 1024 --batch 4   # one GPU

For each engine kind (`--engines plain,deepspeed`, the default) it prints the median step time,
img/s, the step's FLOPs (torch.utils.flop_counter, forward + backward of every model), the achieved
TFLOP/s and its ratio to a square matrix product timed in the same run at the same precision (bf16
on GPU, fp32 on CPU), and peak memory; then the engine step's time over the plain one; on a GPU
also the peak memory of every phase (forward, backward and optimizer step of each engine).

The plain reference (`PlainEngine`) runs `LADDSteps` unchanged on bare modules: student and heads
in fp32 with AdamW (fused on a GPU) and gradient clipping, under bf16 autocast when the precision is
bf16; the frozen teacher in the training precision. The DeepSpeed engines are the trainer's own,
once per placement of `--placements` (default `auto`: the memory plan's stages, as
`deepspeed.*_stage: auto` picks them; `config`: the templates' stages; a number N: student and
heads at ZeRO-N (heads at most 2), the teacher at ZeRO-3 for N = 3 and replicated otherwise). On a
GPU the SD3 GPU templates (ds_configs/gpu/) are used. One process; each run's models are freed
before the next ones are built.
"""

from __future__ import annotations

import argparse
import contextlib
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
from ladd_ds.ladd.build import build_ds_configs, build_models
from ladd_ds.ladd.steps import LADDSteps
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.training.build import training_dtype

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


def bench_config(args):
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    overrides = [
        f"model.teacher={args.preset}",
        "data.source=random_latents",
        f"data.micro_batch_size={args.batch}",
        f"deepspeed.precision={precision}",
        f"model.gradient_checkpointing={str(args.grad_checkpointing).lower()}",
        f"deepspeed.z3_leaf_blocks={str(args.z3_leaf_blocks).lower()}",
        f"model.compile={str(args.compile).lower()}",
        f"discriminator.hidden_channels={args.head_channels}",
    ]
    if args.taps is not None:
        overrides.append(f"discriminator.taps={args.taps}")
    if torch.cuda.is_available():  # overlapped communication, fp32 reduction (ds_configs/gpu/)
        template = "ds_configs/gpu/sd3_large.json" if args.preset == "sd3-large" else "ds_configs/gpu/sd3_medium.json"
        overrides += [f"deepspeed.{name}_config={template}" for name in ("student", "teacher", "heads")]
    return load_config(args.config, overrides)


def build_plain_steps(cfg) -> LADDSteps:
    """LADDSteps on PlainEngines: the models built as the trainer builds them, moved to the device
    (the frozen teacher in the training dtype)."""
    device = ds.device()
    teacher, student, heads, taps = build_models(cfg)
    dtype = training_dtype(cfg)
    teacher.requires_grad_(False).eval().to(device=device, dtype=dtype)
    optim = cfg.optim
    engines = ds.Engines(
        student=PlainEngine(student.to(device), optim.student_lr, optim, optim.grad_clip),
        heads=PlainEngine(heads.to(device), optim.heads_lr, optim, optim.grad_clip),
        teacher=PlainEngine(teacher),
        ds_configs={},
    )
    return LADDSteps(cfg, engines, taps, device)


def placement_config(cfg, placement: str):
    """`cfg` with the engines' stages of one --placements entry."""
    if placement == "config":
        return cfg
    if placement == "auto":
        stages = {"student_stage": "auto", "heads_stage": "auto", "teacher_stage": "auto"}
    else:
        n = int(placement)
        stages = {"student_stage": n, "heads_stage": min(n, 2), "teacher_stage": 3 if n == 3 else 0}
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, **stages))


def build_deepspeed_steps(cfg, placement: str = "config") -> LADDSteps:
    cfg = placement_config(cfg, placement)
    ds_configs = build_ds_configs(cfg, world=1)
    teacher, student, heads, taps = build_models(cfg, ds_configs=ds_configs)
    engines = ds.build_engines(student, teacher, heads, ds_configs, cfg.optim, leaf_blocks=cfg.deepspeed.z3_leaf_blocks)
    return LADDSteps(cfg, engines, taps, ds.device())


class PhaseMemory:
    """Peak device memory of each phase of a step: every engine's forward, backward and optimizer
    step, recorded around the calls LADDSteps makes (CUDA only: the CPU allocator keeps no peak)."""

    def __init__(self, engines: ds.Engines):
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


def time_steps(steps: LADDSteps, batch: dict, args, autocast) -> dict:
    """Median step time after warm-up, the FLOPs of one more step, and peak memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with autocast:
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
        "img_per_s": args.batch / step_s,
        "tflop_per_step": counter.get_total_flops() / 1e12,
        "achieved_tflop_s": counter.get_total_flops() / step_s / 1e12,
        "peak_memory_gib": peak,
        "phase_peak_memory_gib": phases,
    }


def run(args) -> dict:
    kinds = args.engines.split(",")
    unknown = sorted(set(kinds) - set(ENGINE_KINDS))
    if unknown or not kinds:
        raise SystemExit(f"--engines {args.engines}: choose from {', '.join(ENGINE_KINDS)}")
    ds.init_distributed()
    cfg = bench_config(args)
    model_cfg = resolve_model_config(args.preset)
    h, w = args.resolution[0] // VAE_FACTOR, args.resolution[1] // VAE_FACTOR
    patch = model_cfg["patch_size"]
    if h % patch or w % patch:
        raise SystemExit(f"--resolution {args.resolution}: must be divisible by {VAE_FACTOR * patch} (VAE factor x patch size)")
    text_len = args.text_len or (333 if model_cfg["joint_attention_dim"] == 4096 else 8)  # SD3: 77 CLIP + 256 T5
    dtype = training_dtype(cfg)
    device = ds.device()
    batch = synthetic_batch(model_cfg, args.batch, (h, w), text_len, device, dtype)

    runs = {}
    taps = None
    placements = args.placements.split(",")
    bad = sorted(set(placements) - {"auto", "config", "0", "1", "2", "3"})
    if bad:
        raise SystemExit(f"--placements {args.placements}: {bad} unknown; choose from auto, config, 0, 1, 2, 3")
    jobs = [("plain", None)] if "plain" in kinds else []
    jobs += [(f"deepspeed:{p}", p) for p in placements] if "deepspeed" in kinds else []
    for key, placement in jobs:
        if placement is None:
            steps = build_plain_steps(cfg)
            bf16 = dtype == torch.bfloat16
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            runs[key] = {**time_steps(steps, batch, args, autocast), "placement": "plain PyTorch"}
        else:
            steps = build_deepspeed_steps(cfg, placement)
            stages = {name: ds.zero_stage(c) for name, c in steps.engines.ds_configs.items()}
            described = f"{placement}: ZeRO student {stages['student']}, heads {stages['heads']}, teacher {stages['teacher']}"
            runs[key] = {**time_steps(steps, batch, args, contextlib.nullcontext()), "placement": described, "stages": stages}
        taps = len(steps.taps)
        del steps
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    peak = matmul_tflops(dtype, device, args.matmul_size or (8192 if torch.cuda.is_available() else 1024))
    for r in runs.values():
        r["ratio_to_matmul"] = r["achieved_tflop_s"] / peak
    result = {
        "preset": args.preset,
        "resolution": list(args.resolution),
        "latent": [model_cfg["in_channels"], h, w],
        "batch": args.batch,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "compile": cfg.model.compile,
        "heads": taps,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "matmul_tflop_s": peak,
        "peak_memory_kind": "cuda max_allocated" if torch.cuda.is_available() else "process max RSS (whole run so far)",
        "runs": runs,
    }
    if "plain" in runs:
        plain = runs["plain"]["step_s_median"]
        result["engine_over_plain"] = {k: r["step_s_median"] / plain for k, r in runs.items() if k != "plain"}
    return result


def format_report(r: dict) -> str:
    lines = [
        f"LADD step (G + D, {r['heads']} heads): {r['preset']} at {r['resolution'][0]}x{r['resolution'][1]} "
        f"(latent {r['latent']}), batch {r['batch']}, {r['precision']}{', compiled blocks' if r['compile'] else ''}, "
        f"{r['device']}; "
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
    for key, ratio in r.get("engine_over_plain", {}).items():
        lines.append(f"  engine step ({key}) / plain step: {ratio:.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, nargs=2, default=[128, 128], metavar=("H", "W"), help="image pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--engines", default="plain,deepspeed", help="which steps to time, in this order: plain, deepspeed or both")
    p.add_argument(
        "--placements",
        default="auto",
        help="engine placements to time, comma-separated: auto (the memory plan's stages), config (the templates'), or 0-3",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--taps", default=None, help="YAML list of blocks, e.g. '[23]'; default: every block")
    p.add_argument("--head-channels", type=int, default=64)
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--z3-leaf-blocks", action="store_true", help="ZeRO-3 engines gather whole blocks (deepspeed.z3_leaf_blocks)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="model.compile in both steps (the engines need stages below 3: --placements auto on one rank, or 0-2)",
    )
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--config", default=None, help="base run config (default: built-in defaults)")
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
