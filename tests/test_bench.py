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


def test_loader_bench_and_shard_bytes(tmp_path):
    from evaluation import loader_bench, shard_bytes
    from ladd_ds.data.writer import write_random_latents

    data = write_random_latents(tmp_path / "data", 32, latent_shape=(4, 8, 8), text_len=6, text_dim=32, pooled_dim=16)
    r = loader_bench.bench(str(data), batch=4, batches=5, workers=0)
    assert r["samples"] == 20 and r["samples_per_s"] > 0 and r["mb_per_s"] > 0
    rows = shard_bytes.measure((128, 128), samples=2)
    for row in rows:  # the measured size is the raw tensors plus a small per-sample overhead
        item = 2 if row["text_dtype"] == "bf16" else 4
        raw = 16 * 16 * 16 * 2 + (77 + row["max_sequence_length"] + 2048 / 4096) * 4096 * item
        assert raw < row["bytes_per_sample"] < 1.01 * raw + 1024, row
