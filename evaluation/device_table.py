"""One table from a device check's results: every timed step of the bench_step JSON files and
the steps of `ladd-ds train` runs (their metrics.jsonl), with step time, throughput, peak memory
and, for the engines, the memory plan next to the measured peak.

    python -m evaluation.device_table OUT/bench_*.json --train OUT/train_run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = ("run", "placement", "attention", "step ms", "img/s", "peak GiB", "plan GiB", "largest phase (GiB)")


def bench_rows(path: Path) -> list[tuple]:
    r = json.loads(Path(path).read_text())
    rows = []
    for key, run in r["runs"].items():
        phases = run.get("phase_peak_memory_gib") or {}
        largest = max(phases.items(), key=lambda kv: kv[1]) if phases else None
        plan = run.get("planned_memory_gib")
        rows.append(
            (
                f"{Path(path).stem}:{key}",
                run["placement"],
                run.get("attention_backend", "default"),
                f"{run['step_s_median'] * 1000:.1f}",
                f"{run['img_per_s']:.2f}",
                f"{run['peak_memory_gib']:.2f}",
                f"{plan['total']:.2f}" if plan else "-",
                f"{largest[0]} {largest[1]:.2f}" if largest else "-",
            )
        )
    return rows


def train_rows(run_dir: Path, skip: int = 2) -> list[tuple]:
    """The median over a run's logged steps after the first `skip` (compilation, allocator warm-up)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if "time/step_s" in r][skip:] or [r for r in records if "time/step_s" in r]
    if not steady:
        return [(f"train:{Path(run_dir).name}", "ladd-ds train", "-", "no steps logged", "-", "-", "-", "-")]
    step_s = statistics.median(r["time/step_s"] for r in steady)
    img_s = statistics.median(r["throughput/img_per_s"] for r in steady)
    peak = max(r.get("memory/max_allocated_gib", float("nan")) for r in records)
    return [
        (
            f"train:{Path(run_dir).name}",
            f"ladd-ds train, {len(records)} steps",
            "config",
            f"{step_s * 1000:.1f}",
            f"{img_s:.2f}",
            f"{peak:.2f}",
            "-",
            "-",
        )
    ]


def format_table(rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="*", help="bench_step --json files")
    p.add_argument("--train", action="append", default=[], help="a ladd-ds train run directory (repeatable)")
    args = p.parse_args(argv)
    rows = []
    for path in args.bench:
        if Path(path).is_file():
            rows += bench_rows(Path(path))
        else:
            rows.append((Path(path).stem, "no result (see its log)", *["-"] * 6))
    for run_dir in args.train:
        if (Path(run_dir) / "metrics.jsonl").is_file():
            rows += train_rows(Path(run_dir))
        else:
            rows.append((f"train:{Path(run_dir).name}", "no metrics.jsonl (see its log)", *["-"] * 6))
    print(format_table(rows))


if __name__ == "__main__":
    main()
