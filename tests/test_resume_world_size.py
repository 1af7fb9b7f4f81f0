"""Resume on a different world size (2 -> 1 and 1 -> 2 ranks) through DeepSpeed's universal
checkpoint. What is checked against an uninterrupted 2-rank run of the same global batch:
- losses after the resume, and the exported student, EMA and heads (fp32 round-off);
- the data position: the samples of the last step are exactly the uninterrupted run's (the
  loader state is global and the global batch size is unchanged: 8 = 2 x 4 = 1 x 8).
"""

import pytest
import torch

from tests.conftest import TINY_CONFIG, read_metrics, run_cli
from tests.test_multirank import COMMON, assert_state_close, load_export

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

LAYOUT = {1: ["data.micro_batch_size=8"], 2: ["data.micro_batch_size=4"]}
LOSSES = ("loss/generator", "loss/discriminator", "d/real_logit", "d/fake_logit")


def train(run_dir, nproc, max_steps):
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", str(max_steps)]
    for s in COMMON + LAYOUT[nproc] + ["checkpoint.every=3"]:
        args += ["--set", s]
    return run_cli(*args, nproc=nproc)


def export(root, name):
    run_cli("export", "--run", str(root / name), "--out", str(root / f"{name}_export"))
    run_cli("export", "--run", str(root / name), "--out", str(root / f"{name}_export_ema"), "--ema")


def last_ids(run_dir, world):
    ids = []
    for r in range(world):
        ids += torch.load(run_dir / "checkpoints" / "step-00000006" / f"rank-{r:05d}.pt", weights_only=True)["last_sample_ids"]
    return sorted(ids)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_size")
    train(root / "reference", 2, 6)
    export(root, "reference")
    return root


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(reference, first, second):
    root = reference
    name = f"from{first}to{second}"
    train(root / name, first, 3)
    out = train(root / name, second, 6)
    assert "resumed from" in out.stdout and "(universal checkpoint)" in out.stdout
    got, want = read_metrics(root / name), read_metrics(root / "reference")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got[3:], want[3:]):
        for key in LOSSES:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)
    export(root, name)
    for ema in (False, True):
        student, heads = load_export(root, name, ema=ema)
        ref_student, ref_heads = load_export(root, "reference", ema=ema)
        assert_state_close(student, ref_student, f"{name} student (ema={ema})")
        assert_state_close(heads, ref_heads, f"{name} heads")
    assert last_ids(root / name, second) == last_ids(root / "reference", 2)
