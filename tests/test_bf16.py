"""precision bf16, what every GPU run uses, through the commands on CPU ranks: training on two
ZeRO-3 ranks (with the distillation loss), export, sampling the export, and encode.
synth in bf16 is tested in test_synth.py, `sample` on a teacher in test_sampling.py."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ladd_ds.data.loader import stored_tensor
from ladd_ds.models.text_encoders import build_tiny_text_encoders
from tests.conftest import TINY_CONFIG, export, mds_samples, read_metrics, run_cli


@pytest.mark.multiproc
def test_bf16_training_on_two_zero3_ranks_export_and_sample(tmp_path):
    run_dir = tmp_path / "run"
    sets = ["deepspeed.precision=bf16", "logging.progress_bar=false", "ladd.distill_weight=0.5"]
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "2"]
    run_cli(*args, *[a for s in sets for a in ("--set", s)], nproc=2)
    for name in ("student", "teacher"):
        ds_config = json.loads((run_dir / f"ds_config_{name}.json").read_text())
        assert ds_config["bf16"]["enabled"] and ds_config["zero_optimization"]["stage"] == 3, name
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss/generator", "loss/discriminator", "loss/distill", "grad_norm/student"):
        assert all(math.isfinite(r[key]) for r in records), key
    student = export(run_dir, tmp_path / "export", dtype="bf16")  # the default of `ladd-ds export`
    info = json.loads((student / "ladd_export.json").read_text())
    assert info["dtype"] == "bfloat16"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven\n")
    out = tmp_path / "samples"
    run_cli("sample", "--model", str(student), "--prompts", str(prompts), "--steps", "4", "--per-prompt", "2",
            "--precision", "bf16", "--out", str(out), launcher="in-process")  # fmt: skip
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.shape[0] == 2 and images.dtype == np.uint8 and images.std() > 0


def test_bf16_encode_runs_the_text_encoders_in_bf16(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "a.png")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file": "a.png", "caption": "a picture"}) + "\n")
    out = tmp_path / "out"
    sets = ["synth.buckets=[[64,64]]", "text.max_sequence_length=32", "deepspeed.precision=bf16"]
    args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions), "--out", str(out)]
    run_cli(*args, *[a for s in sets for a in ("--set", s)], launcher="in-process")
    sample = mds_samples(out / "64x64")[0]
    assert sample["prompt_embeds"].dtype == np.uint16  # bf16 bits: what the bf16 encoders produced
    stored = stored_tensor(sample["prompt_embeds"])
    bf16 = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).to("cpu", torch.bfloat16)
    assert torch.equal(stored, bf16.encode(["a picture"])[0][0]) and np.isfinite(sample["latent"]).all()
    fp32 = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).encode(["a picture"])[0][0]
    assert not torch.equal(stored.float(), fp32)  # computed in bf16, not fp32
    torch.testing.assert_close(stored.float(), fp32, atol=0.05 * fp32.abs().max().item(), rtol=0)
