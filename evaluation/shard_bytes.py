"""Bytes per sample of the shard format for an SD3-sized sample, measured by writing shards.

    python -m evaluation.shard_bytes [--resolution 1024 1024] [--samples 4]

A sample holds the fp16 latent 16 x H/8 x W/8, prompt_embeds (77 CLIP + max_sequence_length T5
tokens) x 4096 and pooled 2048, the text stored in the run's precision. Prints one row per
(max_sequence_length, text dtype): 256 is SD3's default, 77 the cheaper documented choice.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ladd_ds.data.schema import TORCH_DTYPES
from ladd_ds.data.writer import write_samples
from ladd_ds.models.text_encoders import CLIP_TOKENS

SEQUENCE_LENGTHS = (256, 77)
TEXT_DTYPES = ("bf16", "fp32")


def measure(resolution: tuple[int, int], samples: int, sequence_lengths=SEQUENCE_LENGTHS, text_dtypes=TEXT_DTYPES) -> list[dict]:
    """[{max_sequence_length, text_dtype, bytes_per_sample, text_fraction}], measured on written shards."""
    h, w = resolution[0] // 8, resolution[1] // 8
    rows = []
    for length in sequence_lengths:
        for name in text_dtypes:
            dtype = TORCH_DTYPES[name]
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "ds"
                data = [
                    {
                        "latent": torch.randn(16, h, w),
                        "prompt_embeds": torch.randn(CLIP_TOKENS + length, 4096).to(dtype),
                        "pooled": torch.randn(2048).to(dtype),
                        "prompt": "x" * 80,
                    }
                    for _ in range(samples)
                ]
                write_samples(out, data, size_limit="1gb")
                total = sum(f.stat().st_size for f in out.glob("*.mds")) / samples
            latent_bytes = 16 * h * w * 2
            rows.append(
                {
                    "max_sequence_length": length,
                    "text_dtype": name,
                    "bytes_per_sample": total,
                    "text_fraction": 1 - latent_bytes / total,
                }
            )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, nargs=2, default=[1024, 1024])
    p.add_argument("--samples", type=int, default=4)
    args = p.parse_args(argv)
    print(f"| {args.resolution[0]}x{args.resolution[1]} | text dtype | MB per sample | text share |")
    print("|---|---|---|---|")
    for r in measure(tuple(args.resolution), args.samples):
        print(
            f"| max_sequence_length {r['max_sequence_length']} | {r['text_dtype']} | "
            f"{r['bytes_per_sample'] / 1e6:.2f} | {r['text_fraction']:.0%} |"
        )


if __name__ == "__main__":
    main()
