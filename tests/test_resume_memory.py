"""Resume reads each rank's share of a checkpoint, not the whole of it (host memory measured)."""

import re

import pytest

from tests.conftest import train_tiny

pytestmark = [pytest.mark.multiproc]

# The small preset (3.5M parameters) with random latents of its shape; student and heads at
# ZeRO-3, so each of the 2 ranks saves half of the optimizer state and of the EMA.
SMALL = [
    "model.teacher=small",
    "data.random_latents.latent_channels=16",
    "data.random_latents.text_dim=256",
    "data.random_latents.pooled_dim=64",
    "data.micro_batch_size=2",
    "deepspeed.student_stage=3",
    "deepspeed.heads_stage=3",
    "optim.ema_decay=0.99",
    "checkpoint.every=2",
    "logging.progress_bar=false",
]
REPORT = re.compile(
    r"rank (\d): resume raised host memory by ([\d.]+) MiB at its peak \(engines ([\d.]+) MiB, rank state ([\d.]+) MiB\); "
    r"checkpoint files: this rank's share ([\d.]+) MiB, all ranks ([\d.]+) MiB"
)


def test_each_rank_resumes_with_about_its_share_of_host_memory(tmp_path):
    """Before, every rank loaded every rank's file (the whole EMA, fp32) and concatenated it: here
    the rank state costs one rank file, and the whole resume about one rank's share of the files."""
    run_dir = tmp_path / "run"
    train_tiny(run_dir, 2, SMALL, nproc=2)
    stdout = train_tiny(run_dir, 3, SMALL, nproc=2).stdout
    reports = {int(m[0]): [float(x) for x in m[1:]] for m in REPORT.findall(stdout)}
    assert sorted(reports) == [0, 1], stdout[-3000:]
    for r, (peak, engines, rank_state, share, whole) in reports.items():
        rank_file = (run_dir / "checkpoints" / "step-00000002" / f"rank-{r:05d}.pt").stat().st_size / 2**20
        assert share == pytest.approx(whole / 2, rel=0.05)
        assert rank_state <= 1.1 * rank_file + 1.0, (r, rank_state, rank_file)  # the own file only
        assert peak <= 1.5 * share and peak < 0.75 * whole, (r, peak, share, whole)
