"""What validation during training (eval.every) costs the tiny config, measured, next to the
dry run's FLOP estimate.

    python -m evaluation.validation_cost [--every 20] [--validations 3] [--samples 64] [--ranks 1]

Writes a held-out set shaped like the tiny config's data (random latents: the cost does not
depend on what they show), trains configs/tiny_cpu.yaml for `--validations` x `--every` steps with
validation every `--every` steps, and reads metrics.jsonl: the seconds of each validation after
the one before training (which also reads the stored samples once) and the wall time of the
training steps before each. From them, the share of wall time validation takes at the default eval.every; the
dry run of the same config prints its FLOP share for comparison (on a CPU the tiny models' time
is mostly per-call overhead, so the two differ; on a GPU at scale the FLOPs dominate).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ladd_ds.config import EvalConfig
from ladd_ds.data.writer import write_random_latents

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def ladd_ds(*args: str, ranks: int) -> str:
    cmd = [sys.executable, "-m", "ladd_ds", *args]
    if ranks > 1:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--module", "ladd_ds", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--validations", type=int, default=3)
    parser.add_argument("--samples", type=int, default=EvalConfig.num_samples)
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        held_out = write_random_latents(
            Path(tmp) / "held_out", num_samples=args.samples, latent_shape=(4, 16, 16), text_dim=32, pooled_dim=16, seed=1
        )
        sets = [f"eval.data={held_out}", f"eval.every={args.every}", f"eval.num_samples={args.samples}"]
        sets += ["logging.progress_bar=false", "checkpoint.every=100000"]
        flags = [x for s in sets for x in ("--set", s)]
        run = Path(tmp) / "run"
        steps = args.every * args.validations
        ladd_ds("train", "--config", str(TINY), "--run-dir", str(run), "--max-steps", str(steps), *flags, ranks=args.ranks)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in records if "val/time_share" in r]  # after the one before training (which adds the reference)
        at_default = [x for s in sets if not s.startswith("eval.every=") for x in ("--set", s)]
        dry = ladd_ds("train", "--config", str(TINY), "--dry-run", "--world-size", str(args.ranks), *at_default, ranks=1)

    val_s = sum(r["val/seconds"] for r in vals) / len(vals)
    wall = sum(r["val/seconds"] / r["val/time_share"] for r in vals) / len(vals)  # from one validation's end to the next's
    step_s = (wall - val_s) / args.every  # training, logging and the loop, per step
    default = EvalConfig.every
    planned = re.search(r"validation is ([0-9.]+%) of the compute", dry)
    print(f"tiny config, {args.ranks} CPU rank(s), eval.num_samples {args.samples}, steps {steps}, validation every {args.every}")
    print("| measure | value |\n|---|---|")
    print(f"| one validation (mean of {len(vals)}, after the one before training) | {val_s:.2f} s |")
    print(f"| a training step, wall time between validations | {step_s:.3f} s |")
    print(f"| validation's share of wall time at eval.every {args.every} (measured) | {val_s / wall:.1%} |")
    at_default = val_s / (default * step_s + val_s)
    print(f"| validation's share of wall time at eval.every {default} (from the two above) | {at_default:.1%} |")
    print(f"| the dry run's FLOP share at eval.every {default} | {planned.group(1) if planned else 'not printed'} |")


if __name__ == "__main__":
    main()
