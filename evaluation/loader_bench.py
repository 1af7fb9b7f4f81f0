"""Loader throughput: samples/s and MB/s that the streaming loader delivers for a dataset.

    python -m evaluation.loader_bench --data DIR [--batch 4] [--batches 200] [--workers 2]

Compare with what the trainer consumes: `--step-s S --step-batch B` (default: the reference
plain-PyTorch LADD step of docs/method.md, section 7: SD3-medium at 1024x1024, batch 4 in 0.849 s on one H200)
gives the images per second one GPU needs.
"""

from __future__ import annotations

import argparse
import time

import torch

from ladd_ds.data.loader import build_loader


def bench(data: str, batch: int, batches: int, workers: int) -> dict:
    loader = build_loader(data, batch, seed=0, num_workers=workers, dtype=torch.float32)
    it = iter(loader)
    next(it)  # first batch: worker start-up and shard opening are not throughput
    samples = nbytes = 0
    start = time.perf_counter()
    for i, b in enumerate(it):
        samples += b["latent"].shape[0]
        nbytes += sum(t.numel() * 2 for k, t in b.items() if k in ("latent", "prompt_embeds", "pooled"))  # fp16 on disk
        if i + 1 >= batches:
            break
    elapsed = time.perf_counter() - start
    return {"samples_per_s": samples / elapsed, "mb_per_s": nbytes / elapsed / 1e6, "samples": samples}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--step-s", type=float, default=0.849, help="trainer step time to compare with")
    p.add_argument("--step-batch", type=int, default=4, help="images per trainer step per GPU")
    args = p.parse_args(argv)
    r = bench(args.data, args.batch, args.batches, args.workers)
    need = args.step_batch / args.step_s
    print(f"loader: {r['samples_per_s']:.1f} samples/s, {r['mb_per_s']:.1f} MB/s over {r['samples']} samples")
    print(
        f"trainer needs {need:.2f} samples/s per GPU (batch {args.step_batch} every {args.step_s} s): "
        f"the loader delivers {r['samples_per_s'] / need:.0f}x that"
    )


if __name__ == "__main__":
    main()
