"""The step benchmark keeps working on CPU with the tiny preset, and its FLOP count is sane."""

import math

from evaluation import bench_step


def bench(*extra):
    argv = [
        "--preset",
        "tiny",
        "--resolution",
        "128",
        "256",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--matmul-size",
        "256",
        *extra,
    ]
    return bench_step.run(bench_step.parse_args(argv))


def test_bench_reports_finite_numbers_and_fewer_flops_with_fewer_taps(distributed_world_of_one):
    full = bench()
    assert full["latent"] == [4, 16, 32] and full["heads"] == 3 and full["zero_stage_student"] == 3
    for key in ("step_s_median", "img_per_s", "tflop_per_step", "achieved_tflop_s", "matmul_tflop_s", "peak_memory_gib"):
        assert math.isfinite(full[key]) and full[key] > 0, key
    assert 0 < full["ratio_to_matmul"] < 1.5
    assert "img/s" in bench_step.format_report(full)
    # Tapping only block 0 lets the teacher stop after its first block: the step must count fewer FLOPs.
    first_only = bench("--taps", "[0]", "--zero-stage", "0")
    assert first_only["heads"] == 1 and first_only["zero_stage_student"] == 0
    assert first_only["tflop_per_step"] < 0.8 * full["tflop_per_step"]
