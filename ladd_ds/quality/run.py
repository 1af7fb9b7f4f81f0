"""`ladd-ds evaluate` from start to end: the cells (ladd_ds.quality.evaluate), then the report
(ladd_ds.quality.report)."""

from __future__ import annotations

import time
from pathlib import Path

from ladd_ds.distributed import engines
from ladd_ds.distributed.ranks import barrier, is_main, print0
from ladd_ds.quality.evaluate import Evaluation, Options
from ladd_ds.quality.report import write_report


def run_evaluate(options: Options) -> Path:
    """Every cell on every rank, then results.json, report.md, plots and grids (rank 0). Returns OUT."""
    engines.init_distributed()
    start = time.perf_counter()
    evaluation = Evaluation(options, engines.device())
    results = evaluation.run()
    if is_main():
        write_report(evaluation, results)
    barrier()
    took = time.perf_counter() - start
    print0(f"evaluate: {len(results)} cells of {len(evaluation.jobs)} images in {took:.0f} s -> {evaluation.out / 'report.md'}")
    return evaluation.out
