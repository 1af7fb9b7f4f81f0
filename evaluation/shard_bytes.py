"""Bytes per sample of the shard format for an SD3-sized sample, measured by writing shards.

    python -m evaluation.shard_bytes [--resolution 1024 1024] [--t5-tokens 40] [--samples 8]

Latent 16 x H/8 x W/8, prompt_embeds (77 CLIP + T5 tokens) x 4096 and pooled 2048, all fp16.
Compares the stored (unpadded T5) form with SD3's padded 77 + 256 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ladd_ds.data.writer import write_samples
from ladd_ds.models.text_encoders import CLIP_TOKENS


def measure(resolution: tuple[int, int], t5_tokens: int, samples: int) -> dict:
    h, w = resolution[0] // 8, resolution[1] // 8
    sizes = {}
    for name, tokens in (("stored", CLIP_TOKENS + t5_tokens), ("padded", CLIP_TOKENS + 256)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ds"
            rows = [
                {
                    "latent": torch.randn(16, h, w),
                    "prompt_embeds": torch.randn(tokens, 4096),
                    "pooled": torch.randn(2048),
                    "prompt": "x" * 80,
                }
                for _ in range(samples)
            ]
            write_samples(out, rows, size_limit="1gb")
            sizes[name] = sum(f.stat().st_size for f in out.glob("*.mds")) / samples
    return sizes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, nargs=2, default=[1024, 1024])
    p.add_argument("--t5-tokens", type=int, default=40, help="real T5 tokens of a prompt (incl. </s>)")
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args(argv)
    s = measure(tuple(args.resolution), args.t5_tokens, args.samples)
    print(
        f"{args.resolution[0]}x{args.resolution[1]}, {args.t5_tokens} T5 tokens: {s['stored'] / 1e6:.2f} MB/sample stored, "
        f"{s['padded'] / 1e6:.2f} MB/sample with T5 padded to 256 ({s['stored'] / s['padded']:.0%})"
    )


if __name__ == "__main__":
    main()
