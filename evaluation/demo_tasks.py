"""Measure the digits demo's inpainting and editing teachers (`ladd-ds pretrain-teacher --task`).

Trains (or takes from the cache) a task teacher, samples held-out examples with a plain Euler
loop and classifier-free guidance (the text dropped, the image condition kept in both branches;
shift 1 as the demo's teacher sampler), and scores them with ladd_ds.demo.tasks' metrics and the
demo classifier:

  PYTHONPATH=. python evaluation/demo_tasks.py --task inpaint --steps 800 --init t2i
  PYTHONPATH=. python evaluation/demo_tasks.py --task edit --steps 800 --init scratch --cfg 1 3

Prints one JSON line per CFG scale (and writes them to --out if given), with the teacher's
pretraining time, steps and loss curve from its ladd_model.json. Not part of the test suite
(minutes). --cache must hold the demo classifier (demo-classifier-s1000-seed0), or it is trained.

Measured on the 2-core CPU (Dec 2026; 192 held-out examples, 96 per bucket, 50 Euler steps;
preservation then compared with the source's label, now (tasks.edit_metrics) with the classifier's
reading of the source, and the measure against the label is `preservation_vs_label`):
- inpaint, 800 steps from the t2i teacher, batch 64: CFG 3: alignment 0.96 (region masks 0.97,
  boxes 0.96), kept-region error 0.012; CFG 1: alignment 0.85, error 0.010.
- edit, 800 steps from the t2i teacher: CFG 3: success 0.76 (color 1.0, place 1.0, digit 0.29),
  preservation 0.50 (color edits 0.88, place edits 0.04, digit edits 0.60); CFG 1: success 0.70,
  preservation 0.46. The real targets score success 0.98 and preservation 0.97 with the same
  classifier.
- edit, 2,400 steps from the t2i teacher (the demo's setting until Dec 2026): CFG 3: success
  0.96 (color 1.0, place 1.0, digit 0.88), preservation 0.69 (color edits 0.89, place edits 0.21,
  digit edits 1.0); the real targets of that draw: success 0.98, preservation 0.95. Loss per 50
  steps still falling at the end (0.032). 1,415 s of pretraining, one thread, the CPU shared.
- edit, the demo's setting since Dec 2026 (pretrain.TASK_SETTINGS: 6,000 steps from the t2i
  teacher, moves 3 of every 5 training edits, training times shifted by 3 towards noise; a move
  keeps the glyph's offset in its quadrant, tasks.MOVES): CFG 3: success 0.97 (color 1.0, place
  1.0, digit 0.91), preservation 0.98 (color edits 0.97, place edits 0.97, digit edits 1.0); the
  real targets of that draw: success 0.98, preservation 1.0. Loss per 50 steps 0.010 at the end;
  2,013 s of pretraining (2 threads, the CPU nearly idle).
- from scratch instead (random init, `--init scratch`), 200 steps: loss over steps 150-199 of
  0.148 (edit) and 0.109 (inpaint), against 0.065 and 0.047 at the same steps from the t2i teacher.
- time per step (batch 64, 2 threads, the CPU otherwise nearly idle): 0.36 s, so 800 steps take
  about 5 minutes; with other jobs on the CPU the 800-step runs took 1,257 s (inpaint) and
  1,266 s (edit), one thread each, side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ladd_ds.demo import digits, tasks
from ladd_ds.demo.classifier import cached_classifier
from ladd_ds.demo.presets import SIZES, teacher_settings
from ladd_ds.demo.pretrain import CLIP_CONTEXT, INFO_FILE, cached_teacher, task_settings
from ladd_ds.models.conditioning import join_condition
from ladd_ds.models.flow_model import FlowModel
from ladd_ds.models.registry import build_transformer
from ladd_ds.models.text_encoders import load_sd3_text_encoders


def load_task_teacher(folder: Path, task: str):
    model = FlowModel(build_transformer(str(folder), task=task)).eval()
    text = load_sd3_text_encoders(folder, drop_t5=True, max_sequence_length=0)
    return model, text


@torch.no_grad()
def euler_cfg(model, condition, embeds, pooled, null, steps: int, cfg: float, seed: int) -> torch.Tensor:
    """Latents (B, 12, h, w) from noise by `steps` Euler steps of t: 1 -> 0 (shift 1) with CFG."""
    b, _, h, w = condition.shape
    x = torch.randn((b, digits.LATENT_CHANNELS, h, w), generator=torch.Generator().manual_seed(seed))
    ts = torch.linspace(1.0, 0.0, steps + 1)
    e2, p2 = torch.cat([embeds, null[0].expand_as(embeds)]), torch.cat([pooled, null[1].expand_as(pooled)])
    for i in range(steps):
        t = ts[i].expand(2 * b)
        v = model(join_condition(torch.cat([x, x]), condition), t, e2, p2)  # (2B, 12, h, w)
        vc, vu = v.chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (vu + cfg * (vc - vu))
    return x


def evaluate(folder: Path, task: str, classifier, n: int, steps: int, cfgs: list[float], seed: int = 7) -> list[dict]:
    model, text = load_task_teacher(folder, task)
    null = text.encode([""])
    rows = []
    for cfg in cfgs:
        t0, outputs, parts = time.time(), [], []
        for b, bucket in enumerate(digits.BUCKETS):
            make_examples, make_batch = tasks.TASK_BATCHES[task]
            examples = make_examples(n, "heldout", seed=seed + b, bucket=bucket)
            _, condition, prompts = make_batch(examples)
            embeds, pooled = text.encode(prompts)
            latent = euler_cfg(model, condition, embeds, pooled, null, steps, cfg, seed + b)
            images = digits.CODEC.decode(latent)  # (B, 3, H, W) in [-1, 1]
            if task == "inpaint":
                m = tasks.inpaint_metrics(
                    classifier, images, torch.stack([e.image for e in examples]), torch.stack([e.mask for e in examples]),
                    [e.label for e in examples],
                )  # fmt: skip
                for kind in digits.MASK_KINDS:  # per mask kind as well
                    idx = [i for i, e in enumerate(examples) if e.kind == kind]
                    mk = tasks.inpaint_metrics(
                        classifier, images[idx], torch.stack([examples[i].image for i in idx]),
                        torch.stack([examples[i].mask for i in idx]), [examples[i].label for i in idx],
                    )  # fmt: skip
                    m[f"alignment/{kind}"], m[f"kept_error/{kind}"] = mk["alignment"], mk["kept_error"]
            else:
                sources = torch.stack([e.source for e in examples])
                m = tasks.edit_metrics(
                    classifier, images, sources, [e.source_label for e in examples], [e.target_label for e in examples],
                    [e.kind for e in examples],
                )  # fmt: skip
                # Reference: the real targets, as far as the classifier reads them right.
                real = tasks.edit_metrics(
                    classifier, torch.stack([e.target for e in examples]), sources, [e.source_label for e in examples],
                    [e.target_label for e in examples], [e.kind for e in examples],
                )  # fmt: skip
                m["target_success"], m["target_preservation"] = real["success"], real["preservation"]
            parts.append(m)
            outputs.append(images)
        row = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if all(k in p for p in parts)}
        rows.append({"task": task, "cfg": cfg, "sampling_steps": steps, "n": n * len(digits.BUCKETS), **row,
                     "sampling_seconds": time.time() - t0})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["inpaint", "edit"], required=True)
    ap.add_argument("--steps", type=int, required=True, help="pretraining steps")
    ap.add_argument("--init", choices=["t2i", "scratch"], default="t2i", help="start from the cached demo t2i teacher")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ladd_ds"))
    ap.add_argument("--n", type=int, default=96, help="held-out examples per bucket")
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, nargs="+", default=[3.0])
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()

    s = task_settings(args.task, teacher_settings(SIZES["full"]), steps=args.steps, init=args.init == "t2i")
    if args.lr is not None:
        s = replace(s, lr=args.lr)
    if args.batch_size is not None:
        s = replace(s, batch_size=args.batch_size)
    folder, cached = cached_teacher(args.cache, s)
    info = json.loads((folder / INFO_FILE).read_text())
    classifier, _ = cached_classifier(args.cache, steps=SIZES["full"].classifier_steps)
    for row in evaluate(folder, args.task, classifier, args.n, args.sampling_steps, args.cfg):
        row.update(init=args.init, pretrain_steps=s.steps, lr=s.lr, batch_size=s.batch_size,
                   pretrain_seconds=info["seconds"], teacher=str(folder), clip_context=CLIP_CONTEXT,
                   loss_per_50_steps=[round(v, 4) for v in info["loss_per_50_steps"]])  # fmt: skip
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
