"""DIR/report.md and DIR/fd_vs_steps.png from the demo's measured results (DIR/eval.json).

Every number in the report is read from `results`, which the evaluation code computed; nothing
is typed in. The goal lines are evaluated from the same numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows: list[dict], first_col: str = "model") -> list[str]:
    lines = [
        f"| {first_col} | steps | CFG | FD ↓ | alignment ↑ | digit / color / place acc. | NFE | ms/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r.get("ablation") or r.get("model") or ("teacher" if r["kind"] == "teacher" else "LADD student")
        attrs = f"{r['acc_digit']:.2f} / {r['acc_color']:.2f} / {r['acc_place']:.2f}"
        lines.append(
            f"| {name} | {r['steps']} | {r['cfg']:g} | {_fmt(r['fd'], r['fd_std'], 2)} | "
            f"{_fmt(r['alignment'], r['alignment_std'], 3)} | {attrs} | {r['nfe']} | "
            f"{_fmt(r['ms_per_image'], r['ms_per_image_std'], 1)} |"
        )
    return lines


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked against the measured means."""
    teacher = {r["steps"]: r for r in rows if r["kind"] == "teacher"}
    student = {r["steps"]: r for r in rows if r["kind"] == "student"}
    ref = teacher[max(teacher)]
    out = []
    if 4 in student:
        ratio = student[4]["fd"] / ref["fd"]
        align = student[4]["alignment"] / max(ref["alignment"], 1e-9)
        out.append(
            f"- Student 4 steps vs teacher {ref['steps']} steps: FD ratio {ratio:.2f} (goal ≤ 1.5: "
            f"{'met' if ratio <= 1.5 else 'not met'}), alignment {100 * align:.0f}% of the teacher's "
            f"(goal ≥ 90%: {'met' if align >= 0.9 else 'not met'})."
        )
    if 1 in student and 4 in teacher:
        better = student[1]["fd"] < teacher[4]["fd"]
        out.append(
            f"- Student 1 step FD {student[1]['fd']:.2f} vs teacher 4 steps FD {teacher[4]['fd']:.2f}: "
            f"goal (student better) {'met' if better else 'not met'}."
        )
    return out


def dpo_findings(rows: list[dict]) -> list[str]:
    """Did DPO raise the teacher's alignment, and does the LoRA help the recipe's student?"""
    by = {(r["model"], r["steps"]): r for r in rows}
    out = []
    teachers = [r for r in rows if r["kind"] == "teacher"]
    if len(teachers) == 2:
        base, tuned = teachers
        gain = tuned["alignment"] - base["alignment"]
        out.append(
            f"- Teacher alignment at {base['steps']} steps: {base['alignment']:.3f} -> {tuned['alignment']:.3f} with the "
            f"DPO-LoRA ({gain:+.3f}; digit accuracy {base['acc_digit']:.2f} -> {tuned['acc_digit']:.2f})."
        )
    for steps in (1, 4):
        plain = by.get(("LADD student of the DPO'd teacher", steps))
        recipe = by.get(("... + DPO-LoRA (recipe)", steps))
        if plain and recipe:
            out.append(
                f"- Recipe student at {steps} step(s): alignment {plain['alignment']:.3f} without the LoRA, "
                f"{recipe['alignment']:.3f} with it; FD {plain['fd']:.2f} vs {recipe['fd']:.2f}."
            )
    return out


def plot_fd_vs_steps(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for kind, label, marker in (("teacher", "teacher (Euler + CFG)", "o"), ("student", "LADD student", "s")):
        pts = sorted((r["steps"], r["fd"], r["fd_std"]) for r in rows if r["kind"] == kind)
        if pts:
            steps, fd, std = zip(*pts)
            ax.errorbar(steps, fd, yerr=std, marker=marker, label=label, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD (classifier features) ↓")
    ax.set_title("FD vs. sampling steps (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict) -> Path:
    rows = results["rows"]
    plot_fd_vs_steps(rows, out / "fd_vs_steps.png")
    size = results["size"]
    teacher_table = [r for r in rows if r["kind"] == "student" or r["steps"] in (1, 4, max(size["teacher_steps"]))]
    held_out = results["classifier"]["heldout"]
    lines = [
        "# ladd_ds demo: LADD on colored digits",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"FD: Fréchet distance in the demo classifier's feature space between {results['rows'][0]['num_images']} "
        f"generated images per seed and {results['num_real']} held-out real images; alignment: fraction of "
        f"images whose digit, color and place all match the prompt; mean ± std over {len(size['seeds'])} seeds. "
        "ms/img: sampling + decoding, batched, on this machine.",
        "",
        "## Teacher vs. LADD student",
        "",
        *table(
            sorted(teacher_table, key=lambda r: (r["kind"] != "teacher", -r["steps"] if r["kind"] == "teacher" else r["steps"]))
        ),
        "",
        *goals(rows),
        "",
        "![FD vs steps](fd_vs_steps.png)",
        "",
        "All measured configurations:",
        "",
        *table(rows),
        "",
    ]
    if results.get("ablations"):
        lines += [
            "## Ablations (same pipeline, one setting changed; student at 1 and 4 steps)",
            "",
            *table(results["ablations"], first_col="setting"),
            "",
        ]
    if results.get("dpo"):
        lines += [
            "## DPO recipe (`--dpo`): DPO-LoRA on the teacher, LADD from it, the same LoRA on the student",
            "",
            "Pairs: K teacher samples per prompt ranked by the classifier's confidence in the asked-for digit "
            "(`ladd-ds pairs`); the LoRA is trained by `ladd-ds dpo` (configs/demo.yaml, `dpo` and `pairs`).",
            "",
            *table(results["dpo"]),
            "",
            *dpo_findings(results["dpo"]),
            "",
        ]
    lines += [
        "## Sample grids (one row per prompt, one column per seed)",
        "",
        *[f"![{Path(g).stem}]({g})" for g in results["grids"]],
        "",
        "## Setup",
        "",
        f"- Teacher: `{results['teacher']}` (pretrained by `ladd-ds pretrain-teacher`, cached).",
        "- Classifier accuracy on held-out digits (all of digit, color, place): "
        + ", ".join(f"{bucket}: {acc['all']:.3f} (digit {acc['digit']:.3f})" for bucket, acc in held_out.items())
        + ".",
        f"- Sizes: {', '.join(f'{k}={v}' for k, v in size.items())}.",
        f"- TensorBoard: `tensorboard --logdir {results['tensorboard']}` (losses and sample grids during training).",
        "- Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()) + ".",
        "",
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
