"""Time the full LADD step (generator + discriminator) on synthetic inputs.

    python -m evaluation.bench_step --preset tiny --resolution 128 128 --batch 2
    python -m evaluation.bench_step --preset sd3-medium --resolution 1024 1024 --batch 4   # one GPU

Prints img/s, the step's FLOPs (torch.utils.flop_counter, forward + backward of every engine),
the achieved TFLOP/s and its ratio to a square matrix product timed in the same run at the same
precision (bf16 on GPU, fp32 on CPU), and peak memory. One process; the DeepSpeed engines are the
trainer's own (ZeRO stage set by --zero-stage).
"""

from __future__ import annotations

import argparse
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

VAE_FACTOR = 8  # SD3 VAE: 8x spatial downsampling


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def build_steps(args) -> tuple[LADDSteps, dict]:
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    overrides = [
        f"model.teacher={args.preset}",
        "data.source=random_latents",
        f"data.micro_batch_size={args.batch}",
        f"deepspeed.precision={precision}",
        f"model.gradient_checkpointing={str(args.grad_checkpointing).lower()}",
        f"discriminator.hidden_channels={args.head_channels}",
    ]
    if args.taps is not None:
        overrides.append(f"discriminator.taps={args.taps}")
    cfg = load_config(args.config, overrides)
    model_cfg = resolve_model_config(args.preset)
    ds.init_distributed()
    ds_configs = build_ds_configs(cfg, world=1)
    if args.zero_stage is not None:
        ds_configs["student"]["zero_optimization"] = {"stage": args.zero_stage}
        ds_configs["heads"]["zero_optimization"] = {"stage": min(args.zero_stage, 2)}
        ds_configs["teacher"]["zero_optimization"] = {"stage": 3 if args.zero_stage == 3 else 0}
    teacher, student, heads, taps = build_models(cfg, ds_configs=ds_configs)
    engines = ds.build_engines(student, teacher, heads, ds_configs, cfg.optim)
    return LADDSteps(cfg, engines, taps, ds.device()), model_cfg


def run(args) -> dict:
    steps, model_cfg = build_steps(args)
    h, w = args.resolution[0] // VAE_FACTOR, args.resolution[1] // VAE_FACTOR
    patch = model_cfg["patch_size"]
    if h % patch or w % patch:
        raise SystemExit(f"--resolution {args.resolution}: must be divisible by {VAE_FACTOR * patch} (VAE factor x patch size)")
    text_len = args.text_len or (333 if model_cfg["joint_attention_dim"] == 4096 else 8)  # SD3: 77 CLIP + 256 T5
    batch = synthetic_batch(model_cfg, args.batch, (h, w), text_len, steps.device, steps.dtype)

    for i in range(args.warmup):
        steps.train_step([batch], i)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        steps.train_step([batch], args.warmup + i)
        _sync()
        times.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as counter:
        steps.train_step([batch], args.warmup + args.steps)
    flops = counter.get_total_flops()
    step_s = statistics.median(times)
    achieved = flops / step_s / 1e12
    peak = matmul_tflops(steps.dtype, steps.device, args.matmul_size or (8192 if torch.cuda.is_available() else 1024))
    return {
        "preset": args.preset,
        "resolution": list(args.resolution),
        "latent": [model_cfg["in_channels"], h, w],
        "batch": args.batch,
        "precision": "bf16" if steps.dtype == torch.bfloat16 else "fp32",
        "zero_stage_student": ds.zero_stage(steps.engines.ds_configs["student"]),
        "heads": len(steps.taps),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "step_s_median": step_s,
        "step_s_all": times,
        "img_per_s": args.batch / step_s,
        "tflop_per_step": flops / 1e12,
        "achieved_tflop_s": achieved,
        "matmul_tflop_s": peak,
        "ratio_to_matmul": achieved / peak,
        "peak_memory_gib": peak_memory_gib(),
        "peak_memory_kind": "cuda max_allocated" if torch.cuda.is_available() else "process max RSS",
    }


def format_report(r: dict) -> str:
    return "\n".join(
        [
            f"LADD step (G + D, {r['heads']} heads): {r['preset']} at {r['resolution'][0]}x{r['resolution'][1]} "
            f"(latent {r['latent']}), batch {r['batch']}, {r['precision']}, ZeRO-{r['zero_stage_student']}, {r['device']}",
            f"  step time (median of {len(r['step_s_all'])}): {r['step_s_median'] * 1000:.1f} ms  ->  {r['img_per_s']:.2f} img/s",
            f"  FLOPs per step: {r['tflop_per_step']:.4f} TFLOP  ->  {r['achieved_tflop_s']:.4f} TFLOP/s",
            f"  matmul in the same run: {r['matmul_tflop_s']:.4f} TFLOP/s  ->  ratio {r['ratio_to_matmul']:.1%}",
            f"  peak memory: {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, nargs=2, default=[128, 128], metavar=("H", "W"), help="image pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default: the config's (ZeRO-3)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--taps", default=None, help="YAML list of blocks, e.g. '[23]'; default: every block")
    p.add_argument("--head-channels", type=int, default=64)
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--grad-checkpointing", action="store_true")
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
