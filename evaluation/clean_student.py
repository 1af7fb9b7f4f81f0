"""How clean is the demo's 1-step student, and what makes it cleaner? (docs/demo.md, "Pixel cleanliness")

Takes a finished text-to-image demo (`ladd-ds demo --out DIR`: its teacher and its synth data),
optionally trains its teacher further with a share of samples at t = 1
(`--teacher-t1-share`, `--teacher-steps`: `ladd-ds pretrain-teacher` settings with `init_from`,
cached like the demo's teachers), then trains one LADD run per `--variant NAME[=SET,SET...]`
(configs/demo.yaml, 300 steps, on DIR/data/synthetic, with those `--set` overrides) and
evaluates the teacher at 50, 4 and 1 steps and each student at 1, 2 and 4 steps like the demo
(ladd_ds.demo.evaluate: FD, alignment, hue purity, background), on 192 prompts x `--seeds`:

  PYTHONPATH=. python evaluation/clean_student.py --demo runs/demo --work runs/clean \\
      --variant base --variant renoise_s2=ladd.renoise_s=2.0

Prints a markdown table (and writes it to WORK/table.md). Not part of the test suite (each run
is minutes). Runs already exported under WORK are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    return name, [s for s in sets.split(",") if s] if sets else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a finished `ladd-ds demo` output (its eval.json and data/synthetic)")
    p.add_argument("--work", required=True, help="where the LADD runs and the table go")
    p.add_argument("--cache", default=None, help="the demo's cache (default ~/.cache/ladd_ds)")
    p.add_argument("--variant", action="append", default=[], help="NAME[=SECTION.KEY=VALUE,...]; repeatable")
    p.add_argument("--teacher-t1-share", type=float, default=0.0, help="train the teacher further with this share at t = 1")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=300, help="LADD steps per variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()

    from ladd_ds.demo.classifier import cached_classifier
    from ladd_ds.demo.evaluate import DemoEvaluator, EvalPrompts
    from ladd_ds.demo.presets import SIZES, teacher_sampler, teacher_settings
    from ladd_ds.demo.pretrain import cached_teacher
    from ladd_ds.demo.runner import Runner
    from ladd_ds.demo.stages import ladd_stage, load_teacher
    from ladd_ds.sampling import load_sampling_model

    demo, work = Path(args.demo), Path(args.work)
    cache = Path(args.cache or Path.home() / ".cache" / "ladd_ds")
    size = SIZES["full"]
    teacher = Path(json.loads((demo / "eval.json").read_text())["teacher"])
    if args.teacher_t1_share:
        base = teacher_settings(size)
        settings = replace(
            base, init_from=base, t1_share=args.teacher_t1_share, steps=args.teacher_steps, lr=args.teacher_lr, warmup_steps=0
        )
        teacher, _ = cached_teacher(cache, settings)
    classifier, _ = cached_classifier(cache, steps=size.classifier_steps)
    evaluator = DemoEvaluator(classifier, EvalPrompts.draw(192, seed=2024, combinations="seen"), num_real=size.num_real)
    header = "| model | steps | FD ↓ | alignment ↑ | hue purity ↑ | background ↓ |"
    lines = [f"Teacher `{teacher.name}`; {192 * len(args.seeds)} images per row ({len(args.seeds)} seeds).", "", header]
    lines.append("|---|---|---|---|---|---|")

    def add(name: str, row) -> None:
        s = row.summary()
        lines.append(
            f"| {name} | {s['steps']} | {s['fd']:.2f} | {s['alignment']:.3f} | {s['hue_purity']:.3f} | {s['background']:.2f} |"
        )
        print(lines[-1], flush=True)

    tm, cfg = load_teacher(teacher, size), teacher_sampler()[1]
    for steps in (50, 4, 1):
        add("teacher", evaluator.evaluate("teacher", tm, steps, cfg, args.seeds))
    for name, sets in map(parse_variant, args.variant):
        student = ladd_stage(
            work / name,
            data=demo / "data" / "synthetic",
            teacher=teacher,
            size=replace(size, sample_every=args.steps),
            runner=Runner(),
            max_steps=args.steps,
            sets=sets,
        )
        sm = load_sampling_model(student, precision=size.precision)
        for steps in size.student_steps:
            add(f"{name} {' '.join(sets)}".strip(), evaluator.evaluate(name, sm, steps, 1.0, args.seeds))
    work.mkdir(parents=True, exist_ok=True)
    (work / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
