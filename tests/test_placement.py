"""`auto` ZeRO stages from the memory plan, the plan's arithmetic and activations, and the GPU
DeepSpeed templates (overlapped communication, fp32 reduction and accumulation) on CPU ranks."""

import json
import math

import pytest
import torch

from ladd_ds.config import load_config
from ladd_ds.ladd.build import build_models, place_ladd_engines
from ladd_ds.models.registry import build_transformer
from ladd_ds.training.placement import EngineNeeds, engine_memory
from tests.conftest import EXACT, REPO, TINY_CONFIG, export, read_metrics, run_cli, train_tiny

GPU_TEMPLATE = "ds_configs/gpu/sd3_medium.json"
HEADS_TEMPLATE = "ds_configs/gpu/heads.json"


def meta_linear(n: int, trainable: bool = True) -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Linear(n, 1, bias=False).requires_grad_(trainable)


def test_engine_memory_counts_each_stage_and_dtype():
    n, world = 1000, 4
    bf16_fp32_accum = {"data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"reduce_bucket_size": 10}}
    e = EngineNeeds("student", meta_linear(n), True, "auto", bf16_fp32_accum)
    # ZeRO-3 in bf16: 2 B weights, an fp32 gradient partition, 12 B Adam (master + moments), all / world.
    m = engine_memory(e, stage=3, world=world, precision="bf16")
    assert (m.weights, m.grads, m.optimizer) == (n * 2 / world, n * 4 / world, n * 12 / world)
    # ZeRO-2 keeps the weights whole; ZeRO-1 keeps bf16 grads whole plus its fp32 accumulation copy.
    assert engine_memory(e, stage=2, world=world, precision="bf16").weights == n * 2
    m1 = engine_memory(e, stage=1, world=world, precision="bf16")
    assert (m1.grads, m1.optimizer) == (n * 2 + n * 4, n * 12 / world)
    # Without fp32 accumulation ZeRO-2's partition is in the model dtype; fp32 runs have no master copy.
    plain = EngineNeeds("student", meta_linear(n), True, "auto", {})
    assert engine_memory(plain, stage=2, world=world, precision="bf16").grads == n * 2 / world
    assert engine_memory(plain, stage=0, world=1, precision="fp32").optimizer == n * 8
    # Buffers: the reduce bucket (capped by the model, doubled with overlap_comm, fp32 communication).
    zero = {"reduce_bucket_size": 100, "overlap_comm": True, "allgather_bucket_size": 0}
    overlap = {"communication_data_type": "fp32", "zero_optimization": zero}
    assert (
        engine_memory(EngineNeeds("s", meta_linear(n), True, "auto", overlap), stage=2, world=world, precision="bf16").buffers
        == 100 * 4 * 2
    )
    # A frozen engine holds weights only (and ZeRO-3's gathered parameters).
    frozen = engine_memory(
        EngineNeeds("teacher", meta_linear(n, False), False, "auto", {}), stage=0, world=world, precision="bf16"
    )
    assert (frozen.weights, frozen.grads, frozen.optimizer, frozen.buffers) == (n * 2, 0, 0, 0)


def sd3_config(preset: str, *sets: str):
    config = REPO / "configs" / ("sd3_medium.yaml" if preset == "sd3-medium" else "sd3_large.yaml")
    return load_config(config, ["data.source=random_latents", *sets])


@pytest.mark.parametrize(
    ("preset", "world", "gib", "expected"),
    [
        # 2B on 8 x 80 GiB: ZeRO-2 student, replicated teacher (DeepSpeed's gathers only where needed).
        ("sd3-medium", 8, 80, {"student": 2, "heads": 2, "teacher": 0}),
        # 8B on 8 x 40 GiB: the student's ZeRO-2 state does not fit, nor a replicated teacher.
        ("sd3-large", 8, 40, {"student": 3, "heads": 2, "teacher": 3}),
        # 8B on 64 x 40 GiB: sharded optimizer state is small, the 15 GiB teacher still is not.
        ("sd3-large", 64, 40, {"student": 2, "heads": 2, "teacher": 3}),
        # One rank: nothing to shard.
        ("sd3-medium", 1, 141, {"student": 0, "heads": 0, "teacher": 0}),
    ],
)
def test_auto_stages_follow_the_memory_plan(preset, world, gib, expected):
    sizes = {"height": 128, "width": 128, "text_len": 333, "latent_channels": 16, "text_dim": 4096, "pooled_dim": 2048}
    rl = [f"data.random_latents.{k}={v}" for k, v in sizes.items()]
    cfg = sd3_config(preset, *rl, f"deepspeed.device_memory_gib={gib}")
    configs, placement = place_ladd_engines(cfg, world)
    assert placement.stages == expected and placement.fits
    for name, stage in expected.items():
        assert configs[name]["zero_optimization"]["stage"] == stage
        # DeepSpeed 0.19.8 has no fp32 accumulation at ZeRO-0 (it raises): the key is dropped there.
        assert ("grad_accum_dtype" in configs[name].get("data_types", {})) == (stage > 0 and name != "teacher")
    # bf16 with gradient accumulation on one rank: ZeRO-1 is the lowest stage accumulating in fp32 (the SD3 configs ask for it).
    if world == 1:
        cfg = sd3_config(preset, *rl, f"deepspeed.device_memory_gib={gib}", "optim.grad_accum=2")
        assert place_ladd_engines(cfg, world)[1].stages["student"] == 1


def test_explicit_stages_are_kept():
    cfg = load_config(TINY_CONFIG, ["deepspeed.student_stage=2", "deepspeed.teacher_stage=0"])
    configs, placement = place_ladd_engines(cfg, 4)
    assert placement is None  # no "auto": no plan
    assert [configs[n]["zero_optimization"]["stage"] for n in ("student", "heads", "teacher")] == [2, 2, 0]


def test_dry_run_prints_the_choice_and_why():
    # The config's data.path does not exist here: the plan is printed in full, and the run is
    # reported as one that could not start (exit status 2), for the data only.
    proc = run_cli(
        "train", "--config", str(REPO / "configs" / "sd3_medium.yaml"), "--dry-run", "--world-size", "8",
        "--device-memory-gib", "24", launcher="in-process", check=False,
    )  # fmt: skip
    out, last = proc.stdout, proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "could not start: data: " in last and "memory:" not in last
    assert "student: ZeRO-2, the run fits with it under ZeRO-2" in out
    assert "teacher: ZeRO-0, fits replicated" in out
    assert "of 21.6 GiB usable (90% of 24.0 GiB per device): fits" in out
    assert "activations" in out and "checkpointing: student all, teacher all" in out
    assert "  G step" in out and "  D step" in out and "gradient checkpointing: recompute +" in out
    tight = place_ladd_engines(sd3_config("sd3-medium", "deepspeed.device_memory_gib=11"), 8)[1]
    assert tight.reasons["teacher"].startswith("replicated the run needs")


def test_dry_run_of_a_run_that_does_not_fit_exits_2(tmp_path):
    """The plan's verdict decides the exit status: 1 rank of 4 GiB cannot hold an SD3-medium LADD run."""
    sets = ["--set", "data.source=random_latents", "--set", "data.random_latents.latent_channels=16"]
    sets += ["--set", "data.random_latents.text_dim=4096", "--set", "data.random_latents.pooled_dim=2048"]
    proc = run_cli(
        "train", "--config", str(REPO / "configs" / "sd3_medium.yaml"), "--dry-run", "--world-size", "1",
        "--device-memory-gib", "4", *sets, launcher="in-process", check=False,
    )  # fmt: skip
    assert "DOES NOT FIT" in proc.stdout and proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ladd-ds train: error: --dry-run: the run could not start: memory: the plan needs ")
    assert "data:" not in last


@pytest.mark.multiproc
def test_gpu_templates_with_auto_stages_on_two_ranks(tmp_path, reference_runs):
    """The SD3 GPU templates (overlap_comm, fp32 communication and accumulation; the heads' own) with auto stages
    on 2 CPU ranks: in fp32 it trains exactly what one process does; in bf16 with gradient
    accumulation it runs, and its first step computes the fp32 run's losses within bf16 round-off."""
    from safetensors.torch import load_file

    ref_dir = reference_runs(1)
    reference = export(ref_dir, tmp_path / "ref", step=4)
    ref = load_file(reference / "transformer" / "diffusion_pytorch_model.safetensors")
    gpu = [f"deepspeed.{k}_config={GPU_TEMPLATE}" for k in ("student", "teacher")] + [f"deepspeed.heads_config={HEADS_TEMPLATE}"]
    gpu += [f"deepspeed.{k}_stage=auto" for k in ("student", "teacher", "heads")]
    runs = {
        "fp32": ["data.micro_batch_size=4"],
        "bf16": ["data.micro_batch_size=2", "optim.grad_accum=2", "deepspeed.precision=bf16"],
    }
    for name, sets in runs.items():
        run_dir = tmp_path / name
        proc = train_tiny(run_dir, 4, [*EXACT, *gpu, *sets, "checkpoint.every=4"], nproc=2)
        assert "ZeRO stages: student 2, heads 2, teacher 0" in proc.stdout
        ds_student = json.loads((run_dir / "ds_config_student.json").read_text())
        assert ds_student["zero_optimization"]["overlap_comm"] and ds_student["communication_data_type"] == "fp32"
        assert ds_student["data_types"]["grad_accum_dtype"] == "fp32"
        if name == "fp32":
            out = load_file(export(run_dir, tmp_path / "export") / "transformer" / "diffusion_pytorch_model.safetensors")
            for key in ref:
                torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-4)
        else:
            first, want = read_metrics(run_dir)[0], read_metrics(ref_dir)[0]
            assert all(math.isfinite(r["loss/generator"]) for r in read_metrics(run_dir))
            for key in ("loss/generator", "loss/discriminator"):
                assert first[key] == pytest.approx(want[key], rel=0.05, abs=0.02), key
    initial = build_transformer("tiny", seed=0).state_dict()
    assert max((ref[k] - initial[k]).abs().max() for k in initial) > 50 * 1e-5  # moved beyond the tolerance


def test_bf16_zero2_accumulates_gradients_in_fp32(distributed_world_of_one):
    """What the GPU template's data_types.grad_accum_dtype buys: a bf16 ZeRO-2 engine keeps its
    gradient partition in fp32 (DeepSpeed drops the key at ZeRO-0, where it has none)."""
    from ladd_ds.distributed import engines as ds
    from ladd_ds.training.build import engine_ds_config

    sets = [f"deepspeed.student_config={GPU_TEMPLATE}", "deepspeed.precision=bf16", "optim.grad_accum=2"]
    cfg = load_config(TINY_CONFIG, sets)
    _, student, _, _ = build_models(cfg)
    engine = ds.trainable_engine(student, engine_ds_config(cfg, 1, "student_config", True, stage=2), 1e-3, cfg.optim)
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert engine.optimizer.dtype == torch.bfloat16


def test_auto_on_one_rank_trains_in_bf16(tmp_path):
    """auto on one rank: every engine at ZeRO-0 (bf16 weights, fp32 masters in MasterWeightAdamW), and
    the trained ones at ZeRO-1 when gradients are accumulated and the template asks for fp32
    accumulation (the GPU templates); both train."""
    auto = [f"deepspeed.{k}_stage=auto" for k in ("student", "teacher", "heads")]
    gpu = [f"deepspeed.{k}_config={GPU_TEMPLATE}" for k in ("student", "teacher")] + [f"deepspeed.heads_config={HEADS_TEMPLATE}"]
    for name, extra in (("accum1", []), ("accum2", [*gpu, "optim.grad_accum=2", "data.micro_batch_size=2"])):
        run_dir = tmp_path / name
        sets = [*auto, *extra, "deepspeed.precision=bf16", "logging.progress_bar=false"]
        proc = train_tiny(run_dir, 2, sets, launcher="in-process")
        student = 1 if extra else 0
        assert f"ZeRO stages: student {student}, heads {student}, teacher 0" in proc.stdout
        assert f"deepspeed.student_stage: auto -> ZeRO-{student} (one rank" in proc.stdout
        records = read_metrics(run_dir)
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r[k]) for r in records for k in ("loss/generator", "loss/discriminator", "grad_norm/student"))


def ema_bytes(shadows: dict) -> int:
    return sum(t.numel() * t.element_size() for t in shadows.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plans_ema_is_the_ema_one_rank_keeps(tmp_path, distributed_world_of_one, precision):
    """One rank (ZeRO-0): the plan's EMA term is exactly the bytes of the EMA the run keeps; no EMA
    term without optim.ema_decay."""
    from tests.test_ladd_steps import make_trainer

    trainer = make_trainer(tmp_path / "run", "optim.ema_decay=0.9", f"deepspeed.precision={precision}")
    planned = place_ladd_engines(trainer.cfg, 1, plan_always=True)[1].memory
    assert planned["student"].ema == ema_bytes(trainer.method.ema.shadow) > 0
    assert planned["heads"].ema == planned["teacher"].ema == 0
    trainer.close()
    off = load_config(TINY_CONFIG, ["optim.ema_decay=0"])
    assert place_ladd_engines(off, 1, plan_always=True)[1].memory["student"].ema == 0


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_the_plans_ema_is_each_ranks_share(reference_runs, stage):
    """2 ranks (the shared reference runs; tiny config, EMA on), the student at ZeRO-3 and ZeRO-2:
    each rank's saved EMA is the plan's per-rank term, up to ZeRO-3's padding of each parameter to
    a multiple of the ranks, or ZeRO-2's padding of the flat group to a multiple of 2 elements per
    rank (DeepSpeed's stage_1_and_2.py), which no rank keeps an EMA of."""
    run_dir = reference_runs(2, stage=None if stage == 3 else stage)
    cfg = load_config(run_dir / "config.yaml")
    _, placement = place_ladd_engines(cfg, 2, plan_always=True)
    assert placement.stages["student"] == stage
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    shadows = [torch.load(checkpoint / f"rank-{r:05d}.pt", weights_only=True)["ema"]["shadow"] for r in range(2)]
    planned, n_params = placement.memory["student"].ema, len(shadows[0])
    for measured in map(ema_bytes, shadows):
        if stage == 3:
            assert 0 <= measured - planned <= n_params * 4  # at most one padded element each
        else:
            assert abs(measured - planned) <= 2 * 2 * 4  # the padding: 2 elements per rank x 2 ranks, fp32
    if stage == 2:  # the ranks' pieces together: one fp32 copy of the trained weights
        assert sum(map(ema_bytes, shadows)) == 2 * planned


def test_the_heads_template_holds_buckets_sized_for_the_heads():
    """sd3-large on 64 ranks: the heads' buffers in the plan are their own template's buckets, a
    fraction of what the transformer's template would hold for them (docs/performance.md)."""
    cfg = load_config(REPO / "configs" / "sd3_large.yaml", ["data.source=random_latents"])
    assert cfg.deepspeed.heads_config == HEADS_TEMPLATE
    own = place_ladd_engines(cfg, 64, plan_always=True)[1]
    big = load_config(
        REPO / "configs" / "sd3_large.yaml",
        ["data.source=random_latents", f"deepspeed.heads_config={cfg.deepspeed.student_config}"],
    )
    theirs = place_ladd_engines(big, 64, plan_always=True)[1]
    n = own.params["heads"]
    assert own.stages["heads"] == theirs.stages["heads"] == 2 and n > 1e8
    template = json.loads((REPO / HEADS_TEMPLATE).read_text())["zero_optimization"]
    # Reduce bucket: fp32, double-buffered (overlap_comm); all-gather bucket: bf16 weights.
    assert own.memory["heads"].buffers == template["reduce_bucket_size"] * 4 * 2 + template["allgather_bucket_size"] * 2
    assert theirs.memory["heads"].buffers > 7 * own.memory["heads"].buffers
