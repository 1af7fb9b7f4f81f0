"""Bytes per sample of the shard format for an SD3-sized sample, measured by writing shards.

    python -m evaluation.shard_bytes [--resolution 1024 1024] [--samples 4] [--compression zstd ...]

A sample holds the fp16 latent 16 x H/8 x W/8, prompt_embeds (77 CLIP + max_sequence_length T5
tokens) x 4096 and pooled 2048, the text stored in the run's precision. As in SD3's
conditioning, the 77 CLIP rows hold 2048 values (CLIP-L ++ CLIP-G) zero-padded to the T5 width;
the other values are Gaussian stand-ins. Prints one row per (max_sequence_length, text dtype):
256 is SD3's default, 77 the cheaper documented choice; and per `--compression` (data.compression)
the bytes of the compressed shards.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ladd_ds.data.schema import TORCH_DTYPES
from ladd_ds.data.writer import check_compression, write_samples
from ladd_ds.models.text_encoders import CLIP_TOKENS

SEQUENCE_LENGTHS = (256, 77)
TEXT_DTYPES = ("bf16", "fp32")
COMPRESSIONS = ("zstd",)
CLIP_WIDTH = 2048  # CLIP-L 768 ++ CLIP-G 1280, padded with zeros to T5's 4096


def _samples(resolution: tuple[int, int], length: int, dtype: torch.dtype, n: int) -> list[dict]:
    h, w = resolution[0] // 8, resolution[1] // 8
    rows = []
    for _ in range(n):
        embeds = torch.randn(CLIP_TOKENS + length, 4096)
        embeds[:CLIP_TOKENS, CLIP_WIDTH:] = 0
        rows.append(
            {
                "latent": torch.randn(16, h, w),
                "prompt_embeds": embeds.to(dtype),
                "pooled": torch.randn(2048).to(dtype),
                "prompt": "x" * 80,
            }
        )
    return rows


def _bytes_per_sample(data: list[dict], compression: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = write_samples(Path(tmp) / "ds", data, size_limit="1gb", compression=compression)
        return sum(f.stat().st_size for f in out.glob("shard.*")) / len(data)


def measure(
    resolution: tuple[int, int],
    samples: int,
    sequence_lengths=SEQUENCE_LENGTHS,
    text_dtypes=TEXT_DTYPES,
    compressions=COMPRESSIONS,
) -> list[dict]:
    """[{max_sequence_length, text_dtype, bytes_per_sample, text_fraction, compressed: {compression:
    bytes_per_sample}}], measured on written shards (uncompressed, then with each compression)."""
    for c in compressions:
        check_compression(c, "--compression")
    latent_bytes = 16 * (resolution[0] // 8) * (resolution[1] // 8) * 2
    rows = []
    for length in sequence_lengths:
        for name in text_dtypes:
            data = _samples(resolution, length, TORCH_DTYPES[name], samples)
            total = _bytes_per_sample(data, None)
            rows.append(
                {
                    "max_sequence_length": length,
                    "text_dtype": name,
                    "bytes_per_sample": total,
                    "text_fraction": 1 - latent_bytes / total,
                    "compressed": {c: _bytes_per_sample(data, c) for c in compressions},
                }
            )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, nargs=2, default=[1024, 1024])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--compression", nargs="*", default=list(COMPRESSIONS), help="data.compression values to measure")
    args = p.parse_args(argv)
    rows = measure(tuple(args.resolution), args.samples, compressions=args.compression)
    header = "".join(f" MB per sample, {c} |" for c in args.compression)
    print(f"| {args.resolution[0]}x{args.resolution[1]} | text dtype | MB per sample | text share |{header}")
    print("|---|---|---|---|" + "---|" * len(args.compression))
    for r in rows:
        cells = "".join(f" {b / 1e6:.2f} ({b / r['bytes_per_sample']:.0%}) |" for b in r["compressed"].values())
        print(
            f"| max_sequence_length {r['max_sequence_length']} | {r['text_dtype']} | "
            f"{r['bytes_per_sample'] / 1e6:.2f} | {r['text_fraction']:.0%} |{cells}"
        )


if __name__ == "__main__":
    main()
