"""Resume on a different world size (2 -> 1 and 1 -> 2 ranks) through DeepSpeed's universal
checkpoint. What is checked against an uninterrupted 2-rank run of the same global batch (the
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


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(reference_runs, tmp_path, first, second):
    reference = reference_runs(2)
    run_dir = copy_run_until(reference_runs(first), tmp_path / "run", RESUME_AT)
    out = train_tiny(run_dir, REFERENCE_STEPS, [*EXACT, *GLOBAL_BATCH_8[second]], nproc=second)
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
