"""What `ladd-ds evaluate` writes from its finished cells: results.json (every number), report.md
(a table per bucket and over all buckets), plots/<metric>.png (each metric against network
evaluations, a line per model, a panel per bucket) and grid_<bucket>.png (the same prompts and
seeds side by side: a column per cell, a row per image)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ladd_ds.quality.evaluate import ALL, GRID, CellResult, Evaluation, _write_json
from ladd_ds.sampling import image_grid

# (results key, report column, how a value is printed); KID is shown x 1000, as papers print it
COLUMNS = [
    ("fd", "FD", lambda v: f"{v:.2f}"),
    ("kid", "KID x 1e3", lambda v: f"{1000 * v:.2f}"),
    ("clip", "CLIP score", lambda v: f"{v:.2f}"),
    ("ms_per_image", "ms / image", lambda v: f"{v:.1f}"),
    ("peak_memory_gib", "peak GiB", lambda v: "n/a (CPU)" if v is None else f"{v:.2f}"),
]


def results_record(evaluation: Evaluation, results: list[CellResult]) -> dict:
    e = evaluation
    return {
        "settings": e.settings.__dict__,
        "feature_space": None if e.features is None else e.features.name,
        "clip_model": None if e.clip is None else e.clip.name,
        "reference": e.reference_cell.label if e.reference_cell else e.o.reference,
        "prompts_file": str(e.o.prompts),
        "cells": [r.record() for r in results],
    }


def write_report(evaluation: Evaluation, results: list[CellResult]) -> None:
    out = evaluation.out
    _write_json(out / "results.json", results_record(evaluation, results))
    buckets = [*evaluation.buckets, ALL] if len(evaluation.buckets) > 1 else list(evaluation.buckets)
    lines = [
        "# Evaluation",
        "",
        f"- prompts: {evaluation.o.prompts} ({len({j.prompt_index for j in evaluation.jobs})} prompts, "
        f"{evaluation.o.per_prompt} image(s) each, {len(evaluation.jobs)} images per cell; seed {evaluation.o.seed})",
        f"- buckets: {', '.join(evaluation.buckets)}; precision {evaluation.o.precision}",
    ]
    if evaluation.features is not None:
        ref = evaluation.reference_cell.label if evaluation.reference_cell else f"the images of {evaluation.o.reference}"
        lines.append(f"- FD and KID in the feature space of {evaluation.features.name}, against {ref}")
    if evaluation.clip is not None:
        lines.append(f"- {evaluation.clip.name}: 100 x cosine of image and prompt embeddings")
    lines.append("- cost: network evaluations (NFE) per image; wall time per image on one device, sampling and decoding")
    shown = [c for c in COLUMNS if any(c[0] in r.buckets.get(b, {}) for r in results for b in buckets)]
    for bucket in buckets:
        lines += ["", f"## {'all buckets' if bucket == ALL else bucket}", ""]
        lines.append("| model | steps | NFE | " + " | ".join(c[1] for c in shown) + " |")
        lines.append("|---|---|---|" + "---|" * len(shown))
        for r in results:
            row = r.buckets.get(bucket, {})
            values = [fmt(row[key]) if key in row else "" for key, _, fmt in shown]
            lines.append(f"| {r.cell.label.rsplit(',', 1)[0]} | {r.cell.steps} | {r.nfe} | " + " | ".join(values) + " |")
    grids = write_grids(evaluation, results)
    if grids:
        lines += ["", "## Side by side", "", "Columns, left to right: " + "; ".join(r.cell.label for r in results) + "."]
        lines += [f"![{g.stem}]({g.name})" for g in grids]
    plots = write_plots(out, results, buckets)
    lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def write_grids(evaluation: Evaluation, results: list[CellResult]) -> list[Path]:
    """grid_<bucket>.png: row i holds image i of the grid prompts in every cell."""
    written = []
    cells = [torch.load(evaluation.out / "cells" / r.cell.folder / "features.pt", weights_only=True)[GRID] for r in results]
    for bucket in evaluation.buckets:
        columns = [c[bucket] for c in cells]
        rows = len(columns[0])
        if rows == 0:
            continue
        images = torch.stack([columns[c][i] for i in range(rows) for c in range(len(columns))]).float() / 255.0
        path = evaluation.out / f"grid_{bucket}.png"
        Image.fromarray(image_grid(images, rows)).save(path)
        written.append(path)
    return written


def write_plots(out: Path, results: list[CellResult], buckets: list[str]) -> list[Path]:
    """plots/<metric>.png: the metric against NFE (log scale), a line per model, a panel per bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    written = []
    for key, title, _ in COLUMNS[:4]:
        if not any(key in r.buckets.get(b, {}) for r in results for b in buckets):
            continue
        fig, axes = plt.subplots(1, len(buckets), figsize=(4 * len(buckets), 3.2), squeeze=False)
        for ax, bucket in zip(axes[0], buckets):
            by_model: dict[str, list[tuple[int, float]]] = {}
            for r in results:
                if key in r.buckets.get(bucket, {}):
                    name = r.cell.label.rsplit(",", 1)[0]
                    by_model.setdefault(name, []).append((r.nfe, r.buckets[bucket][key]))
            for name, points in by_model.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network evaluations per image")
            ax.set_title(f"{title}, {'all buckets' if bucket == ALL else bucket}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / f"{key}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def read_results(out: str | Path) -> dict:
    """OUT/results.json of an evaluation."""
    return json.loads((Path(out) / "results.json").read_text())
