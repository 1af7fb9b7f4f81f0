"""DIR/report.md and DIR/fd_vs_steps.png from the demo's measured results (DIR/eval.json).

Every number in the report is read from `results`, which the evaluation code computed; nothing
is typed in. The goal lines are evaluated from the same numbers.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pixels(r: dict) -> str:
    """The pixel-cleanliness cells of a row (ladd_ds.demo.pixels); rows measured before the metric
    existed show –."""
    if "hue_purity" not in r:
        return "– | –"
    if "hue_purity_std" not in r:  # the real renders' reference row: one value
        return f"{r['hue_purity']:.3f} | {r['background']:.2f}"
    return f"{_fmt(r['hue_purity'], r['hue_purity_std'], 3)} | {_fmt(r['background'], r['background_std'], 2)}"


def table(rows: list[dict], first_col: str = "model", reference: dict | None = None) -> list[str]:
    """A markdown table of evaluation rows; rows of LADD runs with a discriminator separation
    (ablations) get a column for it. `reference`: what the held-out real renders score
    (DemoEvaluator.reference), a last row."""
    with_d = any("d_separation" in r for r in rows)
    lines = [
        f"| {first_col} | steps | CFG | FD ↓ | alignment ↑ | digit / color / place acc. | hue purity ↑ | background ↓ "
        "| NFE | ms/img |" + (" D real − fake |" if with_d else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_d else ""),
    ]
    for r in rows:
        name = r.get("ablation") or r.get("model") or ("teacher" if r["kind"] == "teacher" else "LADD student")
        attrs = f"{r['acc_digit']:.2f} / {r['acc_color']:.2f} / {r['acc_place']:.2f}"
        d = r.get("d_separation")
        lines.append(
            f"| {name} | {r['steps']} | {r['cfg']:g} | {_fmt(r['fd'], r['fd_std'], 2)} | "
            f"{_fmt(r['alignment'], r['alignment_std'], 3)} | {attrs} | {_pixels(r)} | {r['nfe']} | "
            f"{_fmt(r['ms_per_image'], r['ms_per_image_std'], 1)} |"
            + ((f" {d:+.3f} |" if d is not None else " – |") if with_d else "")
        )
    if reference is not None:
        r = reference
        attrs = f"{r['acc_digit']:.2f} / {r['acc_color']:.2f} / {r['acc_place']:.2f}"
        lines.append(
            f"| held-out real renders (reference) | – | – | 0 | {r['alignment']:.3f} | {attrs} | {_pixels(r)} | – | – |"
            + (" – |" if with_d else "")
        )
    return lines


# The demo's goals (docs/demo.md, "What the demo shows"): what a teacher worth distilling and a student that
# closes its few-step gap must show. Checked on the measured means, never typed in.
TEACHER_MIN_DIGIT, TEACHER_MIN_ALIGNMENT = 0.85, 0.80
GAP_MIN_FD_RATIO, GAP_MAX_ALIGNMENT_SHARE = 1.5, 0.9  # teacher 4 steps vs its top step count
STUDENT_MAX_FD_RATIO, STUDENT_MIN_ALIGNMENT_SHARE = 1.5, 0.9  # student 4 steps vs teacher top
D_MIN_STDERRS = 3.0  # the heads separate real from fake: mean gap at least this many standard errors
# The 1-step student is as clean as the teacher at its top step count (ladd_ds.demo.pixels).
CLEAN_MIN_PURITY, CLEAN_MAX_BACKGROUND_RATIO = 0.95, 1.5


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _by_steps(rows: list[dict], kind: str) -> dict[int, dict]:
    return {r["steps"]: r for r in rows if r["kind"] == kind}


def student_goals(rows: list[dict], label: str = "") -> list[str]:
    """Goal 4 on one set of rows: the student closes the teacher's few-step gap."""
    teacher, student = _by_steps(rows, "teacher"), _by_steps(rows, "student")
    if not teacher or not student:
        return []
    top = max(teacher)
    ref, out = teacher[top], []
    if 4 in student:
        ratio = student[4]["fd"] / max(ref["fd"], 1e-9)
        share = student[4]["alignment"] / max(ref["alignment"], 1e-9)
        out.append(
            f"- {label}Student 4 steps vs teacher {top} steps: FD ratio {ratio:.2f} (goal ≤ {STUDENT_MAX_FD_RATIO}: "
            f"{_met(ratio <= STUDENT_MAX_FD_RATIO)}), alignment {100 * share:.0f}% of the teacher's "
            f"(goal ≥ {100 * STUDENT_MIN_ALIGNMENT_SHARE:.0f}%: {_met(share >= STUDENT_MIN_ALIGNMENT_SHARE)})."
        )
    if 1 in student and 4 in teacher:
        s1, t4 = student[1], teacher[4]
        better = s1["fd"] < t4["fd"] and s1["alignment"] > t4["alignment"]
        out.append(
            f"- {label}Student 1 step vs teacher 4 steps: FD {s1['fd']:.2f} vs {t4['fd']:.2f}, alignment "
            f"{s1['alignment']:.3f} vs {t4['alignment']:.3f} (goal: better on both: {_met(better)})."
        )
    if 1 in student and 4 in student:
        out.append(
            f"- {label}Student FD from 1 to 4 steps: {student[1]['fd']:.2f} -> {student[4]['fd']:.2f} "
            f"(goal: not worse: {_met(student[4]['fd'] <= student[1]['fd'])})"
            + (
                f"; hue purity {student[1]['hue_purity']:.3f} -> {student[4]['hue_purity']:.3f}, background "
                f"{student[1]['background']:.2f} -> {student[4]['background']:.2f}."
                if "hue_purity" in student[1] and "hue_purity" in student[4]
                else "."
            )
        )
    if 1 in student and "hue_purity" in student[1] and "hue_purity" in ref:
        s1 = student[1]
        ratio = s1["background"] / max(ref["background"], 1e-9)
        clean = s1["hue_purity"] >= CLEAN_MIN_PURITY and ratio <= CLEAN_MAX_BACKGROUND_RATIO
        out.append(
            f"- {label}Student 1 step as clean as the teacher at {top} steps: hue purity {s1['hue_purity']:.3f} "
            f"(goal ≥ {CLEAN_MIN_PURITY}), background {s1['background']:.2f} vs {ref['background']:.2f}, "
            f"{ratio:.2f}x (goal ≤ {CLEAN_MAX_BACKGROUND_RATIO}x): {_met(clean)}."
        )
    return out


def goals(results: dict) -> list[str]:
    """Every goal line of the report, from the measured results."""
    rows = results["rows"]
    teacher = _by_steps(rows, "teacher")
    top = max(teacher)
    ref = teacher[top]
    good = ref["acc_digit"] >= TEACHER_MIN_DIGIT and ref["alignment"] >= TEACHER_MIN_ALIGNMENT
    out = [
        f"- Teacher at {top} steps: digit accuracy {ref['acc_digit']:.3f} (goal ≥ {TEACHER_MIN_DIGIT}), alignment "
        f"{ref['alignment']:.3f} (goal ≥ {TEACHER_MIN_ALIGNMENT}): {_met(good)}."
    ]
    if 4 in teacher:
        ratio = teacher[4]["fd"] / max(ref["fd"], 1e-9)
        share = teacher[4]["alignment"] / max(ref["alignment"], 1e-9)
        gap = ratio >= GAP_MIN_FD_RATIO or share <= GAP_MAX_ALIGNMENT_SHARE
        out.append(
            f"- Few-step gap: teacher 4 steps has {ratio:.2f}x the FD of {top} steps and {100 * share:.0f}% of its "
            f"alignment (goal: FD ≥ {GAP_MIN_FD_RATIO}x or alignment ≤ {100 * GAP_MAX_ALIGNMENT_SHARE:.0f}%: {_met(gap)})."
        )
    runs = results.get("discriminator_runs") or [results.get("discriminator") or {}]
    for k, d in enumerate(runs):
        if not d.get("steps"):
            continue
        separated = d["separation"] > D_MIN_STDERRS * d["separation_stderr"]
        which = f", training run {k + 1} of {len(runs)}" if len(runs) > 1 else ""
        out.append(
            f"- Discriminator after warm-up (step > {d['after_step']}, {d['steps']} logged steps{which}): mean real logit "
            f"{d['real_logit']:.3f}, fake logit {d['fake_logit']:.3f}, separation {d['separation']:+.3f} ± "
            f"{d['separation_stderr']:.3f} (goal: above 0 by at least {D_MIN_STDERRS:g} standard errors: {_met(separated)})."
        )
    no_distill = [r for r in results.get("ablations", []) if r["ablation"] == "without distillation loss"]
    for r in no_distill:
        if r["steps"] in teacher:
            t = teacher[r["steps"]]
            better = r["fd"] < t["fd"]
            out.append(
                f"- Adversarial loss alone (distill_weight 0), {r['steps']} step(s): FD {r['fd']:.2f} vs the teacher's "
                f"{t['fd']:.2f} at the same step count (goal: lower: {_met(better)})."
            )
    out += student_goals(rows)
    if results.get("heldout_rows"):
        out += student_goals(results["heldout_rows"], label="Held-out prompts: ")
    return out


def sampler_sweep_table(results: dict) -> list[str]:
    """The teacher's few-step gap under each sampler setting: the main table's (shift, CFG) from
    its rows (all seeds), the sweep's from one seed."""
    rows = [{**r, "shift": results["teacher_shift"]} for r in results["rows"] if r["kind"] == "teacher"]
    top = max(r["steps"] for r in rows)
    rows = [r for r in rows if r["steps"] in (top, 4)] + results["sampler_sweep"]
    by = {(r["shift"], r["cfg"], r["steps"]): r for r in rows}
    lines = [
        f"| shift | CFG | seeds | FD {top} steps | FD 4 steps | FD ratio 4 / {top} | alignment {top} steps | alignment 4 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shift, cfg in dict.fromkeys((r["shift"], r["cfg"]) for r in rows):
        a, b = by.get((shift, cfg, top)), by.get((shift, cfg, 4))
        if a and b:
            lines.append(
                f"| {shift:g} | {cfg:g} | {a['seeds']} | {a['fd']:.2f} | {b['fd']:.2f} | {b['fd'] / max(a['fd'], 1e-9):.2f} | "
                f"{a['alignment']:.3f} | {b['alignment']:.3f} |"
            )
    return lines


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


def training_runs_table(rows: list[dict]) -> list[str]:
    """The pooled student rows split by training run (FD / alignment, each over the noise seeds)."""
    students = [r for r in rows if r["kind"] == "student" and r.get("per_run")]
    if not students:
        return []
    n = len(students[0]["per_run"])
    lines = [
        "| student steps | " + " | ".join(f"run {k + 1}: FD / alignment" for k in range(n)) + " | pooled |",
        "|---|" + "---|" * (n + 1),
    ]
    for r in students:
        cells = [f"{p['fd']:.2f} / {p['alignment']:.3f}" for p in r["per_run"]]
        lines.append(f"| {r['steps']} | " + " | ".join(cells) + f" | {r['fd']:.2f} / {r['alignment']:.3f} |")
    return lines


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


def curves_table(curves: list[dict]) -> list[str]:
    """The main run's training curves (t2i_eval.training_curves), a row per validation."""
    steps = list(curves[0]["fd_tokens"])
    lines = [
        "| step | loss G | loss D | logit gap (real - fake) | " + " | ".join(f"val FD tokens, {n} step" for n in steps) + " |",
        "|---|---|---|---|" + "---|" * len(steps),
    ]
    for c in curves:
        fds = " | ".join(f"{c['fd_tokens'][n]:.4g}" for n in steps)
        trained = " | ".join(_value(c[k]) for k in ("loss_g", "loss_d", "logit_gap"))  # none before the first step
        lines.append(f"| {c['step']} | {trained} | {fds} |")
    return lines


def _value(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "–"


def plot_curves(curves: list[dict], path: Path) -> Path:
    """Three panels over training steps: the losses, the logit gap, the validation FDs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curves]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), dpi=110)
    axes[0].plot(steps, [c["loss_g"] for c in curves], marker="o", label="generator (hinge)")
    axes[0].plot(steps, [c["loss_d"] for c in curves], marker="s", label="discriminator (hinge)")
    axes[0].set_title("losses (mean since the previous point)")
    axes[1].plot(steps, [c["logit_gap"] for c in curves], marker="o")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set_title("logit gap: d/real - d/fake")
    for n in curves[0]["fd_tokens"]:
        axes[2].plot(steps, [c["fd_tokens"][n] for c in curves], marker="o", label=f"{n} step")
    axes[2].set_yscale("log")  # the 1-step FD falls by more than an order of magnitude
    axes[2].set_title("validation FD, teacher token features ↓")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict) -> Path:
    """DIR/report.md: the text-to-image sections (when the demo ran that task), one section per
    image-conditioned task, then the setup."""
    lines = [
        "# ladd_ds demo: LADD on colored digits",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Precision of synth, LADD, DPO and sampling: {results['size'].get('precision', 'fp32')}.",
        "",
    ]
    if results.get("rows"):
        lines += t2i_sections(out, results)
    for task, task_results in results.get("tasks", {}).items():
        lines += task_section(task, task_results, results)
    size = results["size"]
    held_out = results["classifier"]["heldout"]
    lines += [
        "## Setup",
        "",
        f"- Teacher: `{results['teacher']}` (pretrained by `ladd-ds pretrain-teacher`, cached).",
        *[
            f"- {task} teacher: `{r['teacher']}` (`ladd-ds pretrain-teacher --task {task}`, cached)."
            for task, r in results.get("tasks", {}).items()
        ],
        "- Classifier accuracy on held-out digits (all of digit, color, place): "
        + ", ".join(f"{bucket}: {acc['all']:.3f} (digit {acc['digit']:.3f})" for bucket, acc in held_out.items())
        + ".",
        f"- Sizes: {', '.join(f'{k}={v}' for k, v in size.items())}.",
        *(
            [f"- TensorBoard: `tensorboard --logdir {results['tensorboard']}` (losses and sample grids during training)."]
            if results.get("tensorboard")
            else []
        ),
        "- Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()) + ".",
        "",
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def task_table(rows: list[dict], measures: list, reference: dict | None = None) -> list[str]:
    """A markdown table of an image-conditioned task's rows (ladd_ds.demo.task_pipeline), with a
    column per (key, title, arrow) of `measures`; `reference`: the real answers' scores
    (TaskEvaluator.reference), a last row."""
    lines = [
        "| model | steps | CFG | FD ↓ | "
        + " | ".join(f"{title} {better}" for _, title, better in measures)
        + " | NFE | ms/img |",
        "|---|---|---|---|" + "---|" * len(measures) + "---|---|",
    ]
    for r in rows:
        name = "teacher" if r["kind"] == "teacher" else "LADD student"
        values = " | ".join(_fmt(r[key], r[f"{key}_std"], 3) for key, _, _ in measures)
        lines.append(
            f"| {name} | {r['steps']} | {r['cfg']:g} | {_fmt(r['fd'], r['fd_std'], 2)} | {values} | {r['nfe']} | "
            f"{_fmt(r['ms_per_image'], r['ms_per_image_std'], 1)} |"
        )
    if reference is not None:
        values = " | ".join(f"{reference[key]:.3f}" for key, _, _ in measures)
        lines.append(f"| real answers (reference) | – | – | {reference['fd']:.2f} | {values} | – | – |")
    return lines


def kind_table(rows: list[dict], reference: dict | None = None) -> list[str]:
    """Per kind of example (the measures keyed "<measure>/<kind>", e.g. "preservation/place"): a
    markdown table with a column each, a row per model row and the reference; empty if none."""
    keys = [k for k in rows[0] if "/" in k and not k.endswith("_std")]
    if not keys:
        return []
    keys.sort(key=lambda k: (k.split("/")[0], k.split("/")[1]))
    lines = ["| model | steps | " + " | ".join(k.replace("/", ", ") for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        name = "teacher" if r["kind"] == "teacher" else "LADD student"
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(_fmt(r[k], r[f"{k}_std"], 3) for k in keys) + " |")
    if reference is not None and all(k in reference for k in keys):
        lines.append("| real answers (reference) | – | " + " | ".join(f"{reference[k]:.3f}" for k in keys) + " |")
    return lines


TASK_INTROS = {
    "inpaint": (
        "Inpainting: held-out digits with a mask over the digit's quadrant or over a box of it; the prompt names what "
        "should appear. FD of the results pasted back into the kept area; kept-region error: mean absolute pixel error "
        "(in [-1, 1]) of the raw output outside the mask; filled-region alignment: share of pasted-back results whose "
        "digit, color and place the classifier reads as the prompt asks. The reference row scores the source images."
    ),
    "edit": (
        'Editing: held-out digits with an instruction ("make it green", "move it to the bottom left", "make it a '
        'seven"). Edit success: share of outputs whose requested attribute the classifier reads as asked; '
        "preservation: share whose two other attributes the classifier reads as it reads them on the source image. "
        "The reference row scores the rendered targets."
    ),
}


def _kind_lines(rows: list[dict], reference: dict | None) -> list[str]:
    table = kind_table(rows, reference)
    return ["Per kind of edit:", "", *table, ""] if table else []


def task_section(task: str, task_results: dict, results: dict) -> list[str]:
    rows = task_results["rows"]
    goal = task_results["goal"]
    return [
        f"## {task}: teacher vs. LADD student",
        "",
        TASK_INTROS[task]
        + f" {rows[0]['num_images']} images per seed against {results['num_real']} held-out real images; mean ± std "
        f"over {rows[0]['seeds']} seeds.",
        "",
        *task_table(rows, task_results["measures"], task_results.get("reference")),
        "",
        *_kind_lines(rows, task_results.get("reference")),
        f"- {goal['text']}: {_met(goal['met'])}.",
        f"- TensorBoard: `tensorboard --logdir {task_results['tensorboard']}`.",
        "",
    ]


def t2i_sections(out: Path, results: dict) -> list[str]:
    rows = results["rows"]
    plot_fd_vs_steps(rows, out / "fd_vs_steps.png")
    size = results["size"]
    teacher_table = [r for r in rows if r["kind"] == "student" or r["steps"] in (1, 4, max(size["teacher_steps"]))]
    lines = [
        f"FD: Fréchet distance in the demo classifier's feature space between {results['rows'][0]['num_images']} "
        f"generated images per seed and {results['num_real']} held-out real images; alignment: fraction of "
        f"images whose digit, color and place all match the prompt; mean ± std over {len(size['seeds'])} seeds"
        + (
            f" (student rows: over {size['train_seeds']} training runs x {len(size['seeds'])} seeds). "
            if size.get("train_seeds", 1) > 1
            else ". "
        )
        + "Hue purity: share of glyph pixels with the asked-for color's hue; background: mean pixel value away "
        "from the glyph, in 1/255 (both see the color and texture noise FD and alignment miss; "
        'docs/demo.md, "Pixel cleanliness"). ms/img: sampling + decoding, batched, on this machine.',
        "",
        "## Teacher vs. LADD student",
        "",
        *table(
            sorted(teacher_table, key=lambda r: (r["kind"] != "teacher", -r["steps"] if r["kind"] == "teacher" else r["steps"])),
            reference=results.get("reference"),
        ),
        "",
        "## Goals",
        "",
        *goals(results),
        "",
        "![FD vs steps](fd_vs_steps.png)",
        "",
        "All measured configurations:",
        "",
        *table(rows, reference=results.get("reference")),
        "",
    ]
    if results.get("curves"):
        plot_curves(results["curves"], out / "training_curves.png")
        lines += [
            "## Training curves (the main run)",
            "",
            "Validation during training (`eval.every`): the student's FD against the teacher's samples of held-out "
            'prompts, in the teacher\'s own token-feature space (docs/evaluation.md, "During training"); losses and '
            "the discriminator's logit gap averaged over the steps since the previous validation.",
            "",
            *curves_table(results["curves"]),
            "",
            "![training curves](training_curves.png)",
            "",
        ]
    if training_runs_table(rows):
        lines += [
            "## The student over independent training runs",
            "",
            "The same LADD setting trained with `run.seed` 0, 1, ...; the main table pools them.",
            "",
            *training_runs_table(rows),
            "",
        ]
    if results.get("heldout_rows"):
        lines += [
            "## Held-out prompts",
            "",
            f"{len(results['heldout_combinations'])} (digit, color, place) combinations never appear in synth, in the "
            "student's training or in the DPO pairs (the teacher's pretraining saw every combination); these rows "
            "sample them with noise seeds the table above does not use.",
            "",
            *table(results["heldout_rows"], reference=results.get("heldout_reference")),
            "",
        ]
    if results.get("sampler_sweep"):
        lines += [
            "## The teacher's few-step gap under other sampler settings",
            "",
            "Euler with diffusers' flow-matching scheduler (N steps: sigmas from 1 to 1/1000 in N - 1 intervals, "
            "then 0), schedule shift `sigma = a t / (1 + (a - 1) t)`. The first row is the main table's setting.",
            "",
            *sampler_sweep_table(results),
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
        f"- TensorBoard: `tensorboard --logdir {results['tensorboard']}` (losses and sample grids during training).",
        "",
    ]
    return lines
