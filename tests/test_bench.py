"""The step benchmark keeps working on CPU with the tiny preset, and its FLOP count is sane."""

import json
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
        # Achieved over measured matmul FLOP/s: well below 1 when the FLOP count is right; a
        # loaded 2-core machine measured 2.0 once (matmul and step timed at different moments).
        assert 0 < run["ratio_to_matmul"] < 3
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
    runs = [bench_step.build_plain_steps(cfg), bench_step.build_deepspeed_steps(cfg, "0")[0]]
    plain, engine = ([to_floats(steps.train_step([batch], i)) for i in range(3)] for steps in runs)
    assert plain[2]["loss/generator"] != pytest.approx(plain[0]["loss/generator"], rel=1e-3)  # the updates moved it
    for step in range(3):
        for key in ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit"):
            assert plain[step][key] == pytest.approx(engine[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_loader_bench_and_shard_bytes(tmp_path):
    from evaluation import loader_bench, shard_bytes
    from ladd_ds.data.writer import write_random_latents

    data = write_random_latents(tmp_path / "data", num_samples=32, latent_shape=(4, 8, 8), text_len=6, text_dim=32, pooled_dim=16)
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
    for steps in (bench_step.build_plain_steps(cfg), bench_step.build_deepspeed_steps(cfg, "0")[0]):
        recorder = bench_step.PhaseMemory(steps.engines)
        steps.train_step([batch], 0)
        assert sorted(recorder.peaks) == sorted(phases)
        assert all(gib >= 1 for gib in recorder.peaks.values())


def test_bench_takes_the_production_step_from_the_config():
    """`--config configs/sd3_medium.yaml` times the run's step: its heads, checkpointing, EMA,
    DeepSpeed templates, stages, precision and batch, at the shapes its memory plan assumes; flags
    and --set override the config."""
    from ladd_ds.config import load_config
    from ladd_ds.training.build import planned_shapes
    from tests.conftest import REPO

    path = str(REPO / "configs" / "sd3_medium.yaml")
    want = load_config(path)
    args = bench_step.parse_args(["--config", path])
    cfg = bench_step.bench_config(args)
    assert cfg.model == want.model and cfg.discriminator == want.discriminator and cfg.optim == want.optim
    assert cfg.deepspeed == want.deepspeed and cfg.data.micro_batch_size == want.data.micro_batch_size
    assert cfg.discriminator.hidden_channels != bench_step.BUILTIN["head_channels"]  # not the built-in 64
    assert cfg.model.gradient_checkpointing
    assert bench_step.step_shapes(args, cfg) == planned_shapes(want, bench_step.resolve_model_config(want.model.teacher))[:3]
    flags = ["--config", path, "--head-channels", "32", "--no-grad-checkpointing", "--batch", "1", "--resolution", "512", "512"]
    args = bench_step.parse_args([*flags, "--set", "optim.ema_decay=0.9", "--set", "model.attention_backend=math"])
    cfg = bench_step.bench_config(args)
    assert (cfg.discriminator.hidden_channels, cfg.model.gradient_checkpointing, cfg.data.micro_batch_size) == (32, False, 1)
    assert cfg.optim.ema_decay == 0.9 and cfg.model.attention_backend == "math"
    assert bench_step.step_shapes(args, cfg)[:2] == (64, 64)
    with pytest.raises(SystemExit, match="--placements"):
        bench_step.check_placements(["3:overlap"])


def test_bench_of_a_config_with_ema_bf16_and_two_attention_backends(distributed_world_of_one, monkeypatch, tmp_path):
    """The tiny config keeps an EMA: the plain step updates it (the engines' step is LADDSteps too).
    The bf16 plain step runs each forward in its own autocast region and its optimizer step outside
    any (a region spanning steps would serve stale bf16 weights). Every backend is timed on the
    same built models; the engines carry their memory plan."""
    from tests.conftest import TINY_CONFIG

    args = bench_step.parse_args(["--config", str(TINY_CONFIG), "--precision", "bf16"])
    cfg = bench_step.bench_config(args)
    assert cfg.optim.ema_decay > 0
    steps = bench_step.build_plain_steps(cfg)
    autocast = {"forward": [], "step": []}
    first_block = next(m for m in steps.engines.student.module.modules() if isinstance(m, torch.nn.Linear))
    first_block.register_forward_hook(lambda *_: autocast["forward"].append(torch.is_autocast_enabled("cpu")))
    optimizer = steps.engines.student.optimizer
    original_step = optimizer.step

    def step(*args, **kwargs):
        autocast["step"].append(torch.is_autocast_enabled("cpu"))
        return original_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step)
    shadow = {k: v.clone() for k, v in steps.ema.shadow.items()}
    h, w, text = bench_step.step_shapes(args, cfg)
    batch = bench_step.synthetic_batch(
        bench_step.resolve_model_config("tiny"), 2, (h, w), text, torch.device("cpu"), torch.bfloat16
    )
    steps.train_step([batch], 0)
    assert autocast["forward"] and all(autocast["forward"]) and autocast["step"] == [False]
    assert any(not torch.equal(shadow[k], v) for k, v in steps.ema.shadow.items())  # the EMA update is in the step
    monkeypatch.undo()

    argv = ["--config", str(TINY_CONFIG), "--engines", "deepspeed", "--attention-backends", "default,math"]
    result = bench_step.run(bench_step.parse_args([*argv, "--steps", "1", "--warmup", "0", "--matmul-size", "64"]))
    assert result["ema"] and result["resolution"] == [h * 8, w * 8]
    assert list(result["runs"]) == ["deepspeed:auto@default", "deepspeed:auto@math"]
    assert [r["attention_backend"] for r in result["runs"].values()] == ["default", "math"]
    plan = result["runs"]["deepspeed:auto@math"]["planned_memory_gib"]
    assert plan["total"] == pytest.approx(sum(plan["engines"].values()) + plan["activations"])
    assert "memory plan (GiB): student" in bench_step.format_report(result)
    # The device check's table: one row per timed step, the plan next to the measured peak.
    from evaluation import device_table

    (tmp_path / "bench.json").write_text(json.dumps(result))
    rows = device_table.bench_rows(tmp_path / "bench.json")
    assert [r[0] for r in rows] == ["bench:deepspeed:auto@default", "bench:deepspeed:auto@math"]
    assert rows[1][2] == "math" and float(rows[1][6]) == pytest.approx(plan["total"], abs=0.005)
    assert device_table.format_table(rows).splitlines()[0].startswith("run")


def test_device_check_fails_without_a_gpu_and_its_bench_commands_parse(tmp_path):
    """The prepared GPU check stops at once on a machine without one; every bench_step command in
    it parses, loads its config and names known placements and attention backends."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from tests.conftest import REPO

    script = REPO / "evaluation" / "device_check.sh"
    if not torch.cuda.is_available():
        env = {**os.environ, "PYTHON": sys.executable}
        proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr
        assert not (tmp_path / "out" / "summary.txt").exists()
    text = script.read_text().replace("\\\n", " ")
    base = shlex.split(re.search(r"^bench=\((.*)\)$", text, re.M)[1].replace('"$python" -m evaluation.bench_step', ""))
    commands = [line.split('"${bench[@]}"', 1)[1] for line in text.splitlines() if '"${bench[@]}"' in line]
    assert len(commands) == 3
    for command in commands:
        argv = [
            a.replace("$config", "configs/sd3_medium.yaml").replace("$out", str(tmp_path)) for a in base + shlex.split(command)
        ]
        args = bench_step.parse_args(argv)
        bench_step.check_placements(args.placements.split(","))
        cfg = bench_step.bench_config(args)
        assert cfg.discriminator.hidden_channels == 256 and cfg.model.gradient_checkpointing
        assert set((args.attention_backends or "default").split(",")) <= set(bench_step.PRIORITIES)
