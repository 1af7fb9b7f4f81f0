"""Multi-rank ZeRO-3 LADD equals a single process with the same global batch and seed.

Each run trains the tiny config for a few steps through the real `ladd-ds train` command (CPU
ranks over gloo under the deepspeed launcher) and is exported with `ladd-ds export`; the student,
its EMA and the heads must agree with the single-process run within fp32 round-off.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ladd_ds.models.registry import build_transformer
from tests.conftest import TINY_CONFIG, run_cli

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = 4
COMMON = [
    "logging.progress_bar=false",
    # A large Adam eps keeps updates proportional to the gradient; with the default eps, Adam's
    # first steps move every weight by ~lr * sign(grad) and turn round-off in near-zero
    # gradients into lr-sized differences.
    "optim.eps=0.01",
    "optim.student_lr=1.0e-2",
    "optim.heads_lr=1.0e-2",
    "optim.warmup_steps=0",
]
LAYOUTS = {
    "1rank": (1, ["data.micro_batch_size=8"]),
    "2ranks": (2, ["data.micro_batch_size=4"]),
    "2ranks_accum2": (2, ["data.micro_batch_size=2", "optim.grad_accum=2"]),
    "4ranks": (4, ["data.micro_batch_size=2"]),
}


def train_and_export(root, name):
    nproc, sets = LAYOUTS[name]
    run_dir = root / name
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", str(STEPS)]
    for s in COMMON + sets:
        args += ["--set", s]
    run_cli(*args, nproc=nproc)
    run_cli("export", "--run", str(run_dir), "--out", str(root / f"{name}_export"))
    run_cli("export", "--run", str(run_dir), "--out", str(root / f"{name}_export_ema"), "--ema")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirank")
    return root, {name: train_and_export(root, name) for name in LAYOUTS}


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


@pytest.mark.parametrize("layout", ["2ranks", "2ranks_accum2", "4ranks"])
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


def test_pretrained_folder_loads_partitioned_on_two_ranks(tmp_path):
    """A diffusers folder is loaded shard by shard into ZeRO-3-partitioned teacher and student."""
    folder = tmp_path / "sd3_folder"
    pretrained = build_transformer("tiny", seed=5)  # weights unlike any preset init
    pretrained.save_pretrained(folder / "transformer")
    run_dir = tmp_path / "run"
    sets = ["logging.progress_bar=false", f"model.teacher={folder}", "optim.student_lr=0.0", "optim.heads_lr=0.0"]
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "1"]
    for s in sets:
        args += ["--set", s]
    run_cli(*args, nproc=2)
    run_cli("export", "--run", str(run_dir), "--out", str(tmp_path / "export"))
    student = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in pretrained.state_dict().items():
        assert torch.equal(student[key], value), key  # lr 0: the student is still the folder's copy
    flat = torch.cat([p.detach().double().flatten() for p in pretrained.parameters()])
    state = json.loads((run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["teacher_fingerprint"] == pytest.approx([flat.sum().item(), flat.pow(2).sum().item()], rel=1e-12)
