"""Multi-rank ZeRO-3 (and ZeRO-2) LADD equals a single process with the same global batch and seed.

Each run trains the tiny config for a few steps through the real `ladd-ds train` command (CPU
ranks over gloo under the deepspeed launcher) and is exported (`export_run`, what `ladd-ds export`
runs); the student, its EMA and the heads must agree with the single-process run within fp32
round-off.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ladd_ds.config import load_config
from ladd_ds.ladd.build import build_models, ladd_comms_plan, ladd_layouts
from ladd_ds.models.registry import build_transformer
from tests.conftest import EXACT, GLOBAL_BATCH_8, REFERENCE_STEPS, REPO, TINY_CONFIG, export, read_metrics, run_cli, train_tiny

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = 4
# Layouts of the same global batch of 8. "1rank", "2ranks" and "2ranks_zero2" are the shared
# reference runs (conftest.ReferenceRuns, compared at step STEPS); the others are trained here.
LAYOUTS = {
    "1rank": (1, []),
    "2ranks": (2, []),
    "2ranks_accum2": (2, ["data.micro_batch_size=2", "optim.grad_accum=2"]),
    "4ranks": (4, GLOBAL_BATCH_8[4]),
    "2ranks_zero2": (2, ["deepspeed.student_stage=2"]),  # the shared ZeRO-2 reference run
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_runs):
    root = tmp_path_factory.mktemp("multirank")
    run_dirs = {"1rank": reference_runs(1), "2ranks": reference_runs(2), "2ranks_zero2": reference_runs(2, stage=2)}
    for name in ("2ranks_accum2", "4ranks"):
        nproc, sets = LAYOUTS[name]
        run_dirs[name] = root / name
        train_tiny(run_dirs[name], STEPS, [*EXACT, *sets], nproc=nproc)
    for name, run_dir in run_dirs.items():
        export(run_dir, root / f"{name}_export", step=STEPS)
        export(run_dir, root / f"{name}_export_ema", step=STEPS, ema=True)
    return root, run_dirs


def load_export(root, name, ema=False):
    folder = root / (f"{name}_export_ema" if ema else f"{name}_export")
    return (
        load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
        load_file(folder / "discriminator" / "heads.safetensors"),
    )


def rank_state(run_dir, rank):
    return torch.load(run_dir / "checkpoints" / f"step-{STEPS:08d}" / f"rank-{rank:05d}.pt", weights_only=True)


def assert_state_close(got, want, what):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.parametrize("layout", ["2ranks", "2ranks_accum2", "4ranks", "2ranks_zero2"])
def test_multirank_equals_single_process(runs, layout):
    root, run_dirs = runs
    ref_student, ref_heads = load_export(root, "1rank")
    student, heads = load_export(root, layout)
    assert_state_close(student, ref_student, f"{layout} student")
    assert_state_close(heads, ref_heads, f"{layout} heads")
    ref_ema, _ = load_export(root, "1rank", ema=True)
    ema, _ = load_export(root, layout, ema=True)
    assert_state_close(ema, ref_ema, f"{layout} student EMA")

    # The comparison means something: training moved the student far beyond the tolerance.
    initial = build_transformer("tiny", seed=0).state_dict()
    moved = max((ref_student[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 50 * 1e-5

    # Ranks read different samples, and together the single process's global batch.
    world = LAYOUTS[layout][0]
    ids = [rank_state(run_dirs[layout], r)["last_sample_ids"] for r in range(world)]
    flat = [i for rank_ids in ids for i in rank_ids]
    assert len(set(flat)) == len(flat)  # no sample on two ranks
    assert sorted(flat) == sorted(rank_state(run_dirs["1rank"], 0)["last_sample_ids"])


def test_teacher_is_unchanged_after_training(runs):
    root, run_dirs = runs
    fresh = torch.cat([p.detach().double().flatten() for p in build_transformer("tiny", seed=0).parameters()])
    expected = [fresh.sum().item(), fresh.pow(2).sum().item()]
    for name, run_dir in run_dirs.items():
        state = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
        assert state["teacher_fingerprint"] == pytest.approx(expected, rel=1e-12), name


def test_export_loads_in_diffusers_and_equals_the_checkpoint(runs):
    from diffusers import SD3Transformer2DModel

    root, _ = runs
    model = SD3Transformer2DModel.from_pretrained(str(root / "2ranks_export"), subfolder="transformer")
    student, _ = load_export(root, "2ranks")
    for key, value in model.state_dict().items():
        assert torch.equal(value, student[key]), key
    info = json.loads((root / "2ranks_export" / "ladd_export.json").read_text())
    assert info["step"] == STEPS and info["ema"] is False
    heads_cfg = json.loads((root / "2ranks_export" / "discriminator" / "config.json").read_text())
    assert heads_cfg["taps"] == [0, 1, 2] and heads_cfg["num_heads"] == 3


def test_two_ranks_under_the_deepspeed_launcher(reference_runs):
    run_dir = reference_runs(2)
    assert f"done: step {REFERENCE_STEPS}" in reference_runs.stdout[2]
    final = run_dir / "checkpoints" / f"step-{REFERENCE_STEPS:08d}"
    assert (final / "rank-00000.pt").is_file() and (final / "rank-00001.pt").is_file()
    ds_student = json.loads((run_dir / "ds_config_student.json").read_text())
    assert ds_student["train_batch_size"] == 8 and ds_student["train_micro_batch_size_per_gpu"] == 4  # x 2 ranks
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, REFERENCE_STEPS + 1))
    # logging.progress_bar=false: a plain line per step, from rank 0 only.
    assert [line.split(" | ")[0] for line in reference_runs.stdout[2].splitlines() if line.startswith("step ")] == [
        f"step {s}/{REFERENCE_STEPS}" for s in range(1, REFERENCE_STEPS + 1)
    ]
    # DeepSpeed's ZeRO collectives raise torch's deprecation warnings at every step: each rank
    # shows each once. Both ranks' warnings are in the run's log file, with their rank.
    for deprecated in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        assert reference_runs.stderr[2].count(f"`torch.distributed.{deprecated}` is deprecated") <= 2, deprecated
    log = (run_dir / "train.log").read_text()
    assert log.count("=== ") == 1 and "| world size 2 | starts at step 0" in log
    assert "[rank 0] WARNING" in log and "[rank 1] WARNING" in log
    assert f"done: step {REFERENCE_STEPS}" in log


def test_pretrained_folder_loads_partitioned_on_two_ranks(tmp_path):
    """A diffusers folder is loaded shard by shard into ZeRO-3-partitioned teacher and student."""
    folder = tmp_path / "sd3_folder"
    pretrained = build_transformer("tiny", seed=5)  # weights unlike any preset init
    pretrained.save_pretrained(folder / "transformer")
    run_dir = tmp_path / "run"
    sets = ["logging.progress_bar=false", f"model.teacher={folder}", "optim.student_lr=0.0", "optim.heads_lr=0.0"]
    train_tiny(run_dir, 1, sets, nproc=2)
    run_cli("export", "--run", str(run_dir), "--out", str(tmp_path / "export"))  # the command itself, once: bf16
    student = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in pretrained.state_dict().items():
        assert torch.equal(student[key], value.bfloat16()), key  # lr 0: the student is still the folder's copy
    flat = torch.cat([p.detach().double().flatten() for p in pretrained.parameters()])
    state = json.loads((run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["teacher_fingerprint"] == pytest.approx([flat.sum().item(), flat.pow(2).sum().item()], rel=1e-12)


HPZ_STEPS = 3


def test_hpz_trains_equal_to_single_process(tmp_path, reference_runs):
    """ZeRO++ hpZ (`zero_hpz_partition_size: 2` in the student's and the teacher's ZeRO-3 templates)
    on 4 ranks, the same global batch of 8: per-step losses, logits and gradient norms, and the
    exported student, its EMA and the heads equal the single-process run within fp32 round-off.

    hpZ keeps a second copy of each released weight sharded over the ranks' group of 2; after the
    first gather that follows an optimizer step, ZeRO-3 gathers from those copies within the group
    instead of the world (deepspeed 0.19.8, runtime/zero/partition_parameters.py
    `_partition_param_sec`, `all_gather_coalesced`; the step drops them, stage3.py
    `invalidate_secondary_tensor`). A stale or misplaced copy would train on wrong weights. The
    templates release every weight after each use (no persistence threshold: the tiny model's
    weights are all below the template's 1e5 elements; no prefetch, no reuse distance: a prefetch
    bucket of the whole model kept it gathered from the forward to the step), so that the
    student's backward and the teacher's every forward gather within the groups: the
    communication plan, checked against DeepSpeed's comms logger on such runs in
    tests/test_comms_plan.py, says so for these configs."""
    templates = {}
    for engine, source in (("student", "ds_configs/cpu/zero3.json"), ("teacher", "ds_configs/cpu/zero3_frozen.json")):
        template = json.loads((REPO / source).read_text())
        template["zero_optimization"].update(
            zero_hpz_partition_size=2,
            stage3_param_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_reuse_distance=0,
        )
        templates[engine] = tmp_path / f"{engine}_hpz.json"
        templates[engine].write_text(json.dumps(template))
    run_dir = tmp_path / "hpz"
    sets = [f"deepspeed.{engine}_config={path}" for engine, path in templates.items()]
    proc = train_tiny(run_dir, HPZ_STEPS, [*EXACT, *GLOBAL_BATCH_8[4], *sets], nproc=4)
    assert "ZeRO stages: student 3, heads 2, teacher 3" in proc.stdout
    configs = {e: json.loads((run_dir / f"ds_config_{e}.json").read_text()) for e in ("student", "heads", "teacher")}
    for engine in templates:
        assert configs[engine]["zero_optimization"]["zero_hpz_partition_size"] == 2
    cfg = load_config(TINY_CONFIG, sets)
    teacher, student, heads, _ = build_models(cfg, device="meta")
    models = {"teacher": teacher, "student": student, "heads": heads}
    plan = ladd_comms_plan(cfg, 4, configs, ladd_layouts(cfg, configs, models))
    for engine in templates:
        gather = plan.engines[engine]["all_gather"]
        assert gather.group == 2 and gather.logged_in_groups > 0, engine

    ref_dir = reference_runs(1)  # a checkpoint after every step, no warm-up: its first steps are a 3-step run's
    got, want = read_metrics(run_dir), read_metrics(ref_dir)[:HPZ_STEPS]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, HPZ_STEPS + 1))
    keys = ["loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit", "grad_norm/student", "grad_norm/heads"]
    for g, w in zip(got, want):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), f"step {g['step']} {key}"

    def exported(src, name, ema=False):
        out = export(src, tmp_path / name, step=HPZ_STEPS, ema=ema)
        return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"), load_file(
            out / "discriminator" / "heads.safetensors"
        )

    ref_student, ref_heads = exported(ref_dir, "ref_export")
    student, heads = exported(run_dir, "hpz_export")
    assert_state_close(student, ref_student, "hpZ student")
    assert_state_close(heads, ref_heads, "hpZ heads")
    assert_state_close(
        exported(run_dir, "hpz_export_ema", ema=True)[0], exported(ref_dir, "ref_export_ema", ema=True)[0], "hpZ student EMA"
    )
    # The comparison means something: the student moved far beyond the tolerance.
    initial = build_transformer("tiny", seed=0).state_dict()
    assert max((ref_student[k] - initial[k]).abs().max().item() for k in initial) > 50 * 1e-5
