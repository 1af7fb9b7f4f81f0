"""The step benchmark keeps working on CPU with the tiny preset, and its FLOP count is sane."""

import math

import pytest
import torch

from evaluation import bench_step
from ladd_ds.training.metrics import to_floats


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


def test_bench_times_plain_and_engine_steps_of_the_same_math(distributed_world_of_one):
    full = bench()
    assert full["latent"] == [4, 16, 32] and full["heads"] == 3
    # auto on one fp32 rank: nothing to shard, every engine at ZeRO-0.
    assert list(full["runs"]) == ["plain", "deepspeed:auto"]
    assert full["runs"]["deepspeed:auto"]["stages"] == {"student": 0, "heads": 0, "teacher": 0}
    plain, engine = full["runs"]["plain"], full["runs"]["deepspeed:auto"]
    for run in (plain, engine):
        for key in ("step_s_median", "img_per_s", "tflop_per_step", "achieved_tflop_s", "peak_memory_gib"):
            assert math.isfinite(run[key]) and run[key] > 0, key
        assert 0 < run["ratio_to_matmul"] < 1.5
    # The same step code on both: the same FLOPs (ZeRO adds communication, not arithmetic).
    assert engine["tflop_per_step"] == pytest.approx(plain["tflop_per_step"], rel=1e-6)
    assert full["engine_over_plain"]["deepspeed:auto"] == pytest.approx(engine["step_s_median"] / plain["step_s_median"])
    assert plain["phase_peak_memory_gib"] is None  # CUDA only
    report = bench_step.format_report(full)
    assert "img/s" in report and "engine step (deepspeed:auto) / plain step" in report
    # Tapping only block 0 lets the teacher stop after its first block: the step must count fewer FLOPs.
    first_only = bench("--taps", "[0]", "--placements", "3", "--engines", "deepspeed")
    assert first_only["heads"] == 1 and list(first_only["runs"]) == ["deepspeed:3"]
    assert first_only["runs"]["deepspeed:3"]["stages"] == {"student": 3, "heads": 2, "teacher": 3}
    assert first_only["runs"]["deepspeed:3"]["tflop_per_step"] < 0.8 * engine["tflop_per_step"]


def test_plain_engine_trains_like_the_deepspeed_engine(distributed_world_of_one):
    """The benchmark's reference is the same training: from the same models and batch, three LADD
    steps on PlainEngines and on ZeRO-0 engines give the same losses (fp32). The losses of the
    later steps depend on the earlier updates of student and heads (optimizer, warm-up, clipping)."""
    args = bench_step.parse_args(["--preset", "tiny", "--batch", "2"])
    cfg = bench_step.bench_config(args)
    model_cfg = bench_step.resolve_model_config("tiny")
    batch = bench_step.synthetic_batch(model_cfg, 2, (16, 16), 8, torch.device("cpu"), torch.float32)
    runs = [bench_step.build_plain_steps(cfg), bench_step.build_deepspeed_steps(cfg, "0")]
    plain, engine = ([to_floats(steps.train_step([batch], i)) for i in range(3)] for steps in runs)
    assert plain[2]["loss/generator"] != pytest.approx(plain[0]["loss/generator"], rel=1e-3)  # the updates moved it
    for step in range(3):
        for key in ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit"):
            assert plain[step][key] == pytest.approx(engine[step][key], rel=1e-4, abs=1e-6), (step, key)


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
        # zstd (data.compression) drops at least the zero half of the CLIP rows
        assert row["compressed"]["zstd"] < row["bytes_per_sample"] - 0.9 * 77 * 2048 * item, row


def test_phase_memory_records_every_engine_phase(distributed_world_of_one, monkeypatch):
    """The per-phase peaks wrap the calls LADDSteps makes, on plain and DeepSpeed engines alike.
    The CUDA allocator's counters are stood in for by a counter that grows with every call."""
    calls = iter(range(1, 10_000))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(calls) * 2**30)
    args = bench_step.parse_args(["--preset", "tiny", "--batch", "2"])
    cfg = bench_step.bench_config(args)
    model_cfg = bench_step.resolve_model_config("tiny")
    batch = bench_step.synthetic_batch(model_cfg, 2, (16, 16), 8, torch.device("cpu"), torch.float32)
    phases = [f"{e} {p}" for e in ("student", "heads") for p in ("forward", "backward", "step")] + ["teacher forward"]
    for steps in (bench_step.build_plain_steps(cfg), bench_step.build_deepspeed_steps(cfg, "0")):
        recorder = bench_step.PhaseMemory(steps.engines)
        steps.train_step([batch], 0)
        assert sorted(recorder.peaks) == sorted(phases)
        assert all(gib >= 1 for gib in recorder.peaks.values())
