"""GPU checks (skipped on CPU-only machines): the bf16 step benchmark on one GPU."""

import math

import pytest

from evaluation import bench_step


@pytest.mark.gpu
def test_bf16_step_benchmark_on_gpu(distributed_world_of_one):
    r = bench_step.run(bench_step.parse_args(["--preset", "tiny", "--resolution", "256", "256", "--batch", "4", "--steps", "3"]))
    assert r["precision"] == "bf16" and r["device"] != "cpu" and list(r["runs"]) == ["plain", "deepspeed"]
    for run in r["runs"].values():
        assert math.isfinite(run["ratio_to_matmul"]) and 0 < run["ratio_to_matmul"] < 1.5
    assert r["runs"]["plain"]["tflop_per_step"] == pytest.approx(r["runs"]["deepspeed"]["tflop_per_step"], rel=1e-6)
