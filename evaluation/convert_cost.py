"""Cost of `ladd-ds convert-checkpoint` (DeepSpeed's universal format) per GiB of checkpoint.

    python -m evaluation.convert_cost [--widths 128 512] [--layers 8] [--ranks 2]

For each width, a random SD3-architecture transformer of that width is saved as a model folder,
trained one step on `--ranks` CPU ranks (student and heads at ZeRO-3, EMA on) so that a real
checkpoint exists, and that checkpoint is converted in this process, timed. Two sizes separate the
fixed cost (one `ds_to_universal` process per engine) from the cost per GiB; the table printed
gives the checkpoint size, the time, and the fitted cost per GiB with the fixed part.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from diffusers import SD3Transformer2DModel

from ladd_ds.training.convert import convert_run

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_teacher(folder: Path, width: int, layers: int) -> None:
    """A random transformer folder whose text widths match the tiny text encoders and the
    tiny config's random latents (so the run needs nothing else)."""

    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=64,
        num_attention_heads=max(1, width // 64),
        joint_attention_dim=32,
        caption_projection_dim=width,
        pooled_projection_dim=16,
        pos_embed_max_size=32,
    )
    model.save_pretrained(folder / "transformer")


def train_one_step(teacher: Path, run_dir: Path, ranks: int) -> None:
    sets = [
        f"model.teacher={teacher}",
        "deepspeed.student_stage=3",
        "deepspeed.heads_stage=3",
        "optim.ema_decay=0.99",
        "data.micro_batch_size=1",
        "data.random_latents.num_samples=8",
        "logging.progress_bar=false",
    ]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(_free_port())]
    cmd += ["--module", "ladd_ds", "train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    cmd += ["--run-dir", str(run_dir), "--max-steps", "1", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training the {teacher.name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs=2, default=[128, 512], help="two transformer widths (multiples of 64)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            teacher, run_dir = Path(tmp) / f"teacher{width}", Path(tmp) / f"run{width}"
            make_teacher(teacher, width, args.layers)
            train_one_step(teacher, run_dir, args.ranks)
            convert_run(run_dir)
            record = json.loads(next(run_dir.glob("checkpoints/step-*/universal/conversion.json")).read_text())
            rows.append((width, record["bytes"] / 2**30, record["seconds"]))
    (w1, g1, s1), (w2, g2, s2) = rows
    per_gib = (s2 - s1) / (g2 - g1)
    fixed = s1 - per_gib * g1
    print("\n| width | checkpoint GiB | convert s | s per GiB (whole) |")
    print("|---|---|---|---|")
    for width, gib, seconds in rows:
        print(f"| {width} | {gib:.3f} | {seconds:.1f} | {seconds / gib:.1f} |")
    print(f"\nfitted: {per_gib:.1f} s per GiB + {fixed:.1f} s fixed ({args.ranks} ranks, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
