"""Resume on a different world size (2 -> 1 ranks with the student at ZeRO-2, whose EMA each rank
keeps of its optimizer partition; 1 -> 2 at ZeRO-3) through DeepSpeed's universal checkpoint.
What is checked against an uninterrupted 2-rank run of the same global batch and stage (the
shared reference run):
- losses after the resume, and the exported student, EMA and heads (fp32 round-off);
- the data position: the samples of the last step are exactly the uninterrupted run's (the
  loader state is global and the global batch size is unchanged: 8 = 2 x 4 = 1 x 8).
The first part of each run is the reference run of the first world size up to its step-3
checkpoint (conftest.copy_run_until).
"""

import json

import pytest
import torch

from ladd_ds.models.registry import build_transformer
from tests.conftest import EXACT, GLOBAL_BATCH_8, REFERENCE_STEPS, copy_run_until, export, read_metrics, train_tiny
from tests.test_multirank import assert_state_close, load_export

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

RESUME_AT = 3
LOSSES = ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit")


def last_ids(run_dir, world):
    ids = []
    for r in range(world):
        path = run_dir / "checkpoints" / f"step-{REFERENCE_STEPS:08d}" / f"rank-{r:05d}.pt"
        ids += torch.load(path, weights_only=True)["last_sample_ids"]
    return sorted(ids)


# 2 -> 1 from the ZeRO-2 run (each rank's EMA a piece of its partition), 1 -> 2 at ZeRO-3.
@pytest.mark.parametrize("first, second, stage", [(2, 1, 2), (1, 2, None)])
def test_resume_on_another_world_size(reference_runs, tmp_path, first, second, stage):
    reference = reference_runs(2, stage)
    run_dir = copy_run_until(reference_runs(first, stage), tmp_path / "run", RESUME_AT)
    sets = [*EXACT, *GLOBAL_BATCH_8[second]] + ([] if stage is None else [f"deepspeed.student_stage={stage}"])
    out = train_tiny(run_dir, REFERENCE_STEPS, sets, nproc=second)
    assert f"step-{RESUME_AT:08d} at step {RESUME_AT} (universal checkpoint)" in out.stdout
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, REFERENCE_STEPS + 1))
    for g, w in zip(got[RESUME_AT:], want[RESUME_AT:]):
        for key in LOSSES:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)
    for name, run in (("resumed", run_dir), ("reference", reference)):
        export(run, tmp_path / f"{name}_export")
        export(run, tmp_path / f"{name}_export_ema", ema=True)
    for ema in (False, True):
        student, heads = load_export(tmp_path, "resumed", ema=ema)
        ref_student, ref_heads = load_export(tmp_path, "reference", ema=ema)
        assert_state_close(student, ref_student, f"{first} -> {second} ranks student (ema={ema})")
        assert_state_close(heads, ref_heads, f"{first} -> {second} ranks heads")
    assert last_ids(run_dir, second) == last_ids(reference, 2)
    # The world size changed with the same global batch: accepted, and recorded at the resume.
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["world_size"]) for h in history] == [(0, first), (RESUME_AT, second)]
    assert history[1]["changed"].get("data.micro_batch_size") == [8 // first, 8 // second]


def test_resume_on_the_same_world_size_at_zero2_is_exact(reference_runs, tmp_path):
    """2 ZeRO-2 ranks resumed from their step-5 checkpoint: each rank loads its own EMA pieces and
    the last step's losses and EMA are bit for bit the uninterrupted run's."""
    reference = reference_runs(2, stage=2)
    run_dir = copy_run_until(reference, tmp_path / "run", REFERENCE_STEPS - 1)
    train_tiny(run_dir, REFERENCE_STEPS, [*EXACT, *GLOBAL_BATCH_8[2], "deepspeed.student_stage=2"], nproc=2)
    got, want = read_metrics(run_dir)[-1], read_metrics(reference)[-1]
    assert all(got[key] == want[key] for key in LOSSES), (got, want)
    kept = 0
    for r in range(2):
        name = f"step-{REFERENCE_STEPS:08d}/rank-{r:05d}.pt"
        ema, ref = (torch.load(d / "checkpoints" / name, weights_only=True)["ema"] for d in (run_dir, reference))
        assert ema["offset"] == ref["offset"], r
        assert all(torch.equal(ema["shadow"][n], ref["shadow"][n]) for n in ref["shadow"]), r
        kept += sum(t.numel() for t in ema["shadow"].values())
    assert kept == sum(p.numel() for p in build_transformer("tiny", seed=0).parameters())  # one copy in all
