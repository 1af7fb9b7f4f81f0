"""The data checks `ladd-ds train` and `ladd-ds dpo` run before any model is built
(ladd_ds.data.checks): buckets named by the manifest, bucket sizes against the global batch
(data.drop_small_buckets), stored shapes against model.teacher."""

import json

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from ladd_ds.data.schema import PAIRS
from ladd_ds.data.writer import write_random_latents, write_samples
from tests.conftest import TINY_CONFIG, cli_error, run_cli

DPO_CONFIG = TINY_CONFIG.with_name("tiny_dpo_cpu.yaml")
TINY = dict(text_len=8, text_dim=32, pooled_dim=16)  # the tiny teacher's text widths (4 channels, patch 2)


def write_root(root, buckets, manifest=None, channels=4, **shapes):
    """A multi-bucket root as `ladd-ds synth` writes it: ROOT/<bucket>/ datasets ("HxW" pixels,
    latents of H/8 x W/8) and ROOT/manifest.json listing `manifest` (default: `buckets`)."""
    for i, (name, n) in enumerate(buckets.items()):
        h, w = (int(x) // 8 for x in name.split("x"))
        write_random_latents(root / name, num_samples=n, latent_shape=(channels, h, w), seed=i, bucket=name, **{**TINY, **shapes})
    listed = buckets if manifest is None else manifest
    (root / "manifest.json").write_text(json.dumps({"samples": sum(listed.values()), "buckets": listed}))
    return root


@pytest.fixture
def no_models(monkeypatch):
    """Building a method's models fails the test: the checks must come first."""
    from ladd_ds.dpo.method import DPOMethod
    from ladd_ds.ladd.method import LADDMethod

    def build(cls, cfg, ds_configs):
        raise AssertionError("models were built before the data check")

    for method in (LADDMethod, DPOMethod):
        monkeypatch.setattr(method, "build", classmethod(build))


def train_args(tmp_path, root, *sets):
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), "--max-steps", "1"]
    for s in ("data.source=mds", f"data.path={root}", "logging.progress_bar=false", *sets):
        args += ["--set", s]
    return args


def test_a_bucket_of_the_manifest_without_index_is_named(tmp_path, capsys, no_models):
    root = write_root(tmp_path / "data", {"128x128": 8}, manifest={"128x128": 8, "64x128": 8})
    err = cli_error(capsys, *train_args(tmp_path, root))
    assert "['64x128']" in err and "64x128: 8 samples" in err and str(root / "64x128" / "index.json") in err


def test_a_bucket_with_other_count_than_the_manifest_is_named(tmp_path, capsys, no_models):
    root = write_root(tmp_path / "data", {"128x128": 8, "64x128": 8}, manifest={"128x128": 8, "64x128": 16})
    err = cli_error(capsys, *train_args(tmp_path, root))
    assert "bucket '64x128' holds 8 samples" in err and "says 16" in err


def test_a_bucket_smaller_than_the_global_batch_is_named(tmp_path, capsys, no_models):
    root = write_root(tmp_path / "data", {"128x128": 16, "64x128": 3})
    err = cli_error(capsys, *train_args(tmp_path, root, "data.micro_batch_size=4", "optim.grad_accum=2"))
    assert "{'64x128': 3}" in err and "'128x128'" not in err
    assert "global batch of 8 (data.micro_batch_size 4 x optim.grad_accum 2 x 1 rank(s))" in err
    assert "data.drop_small_buckets: true" in err


def test_drop_small_buckets_warns_once_and_trains_on_the_others(tmp_path, monkeypatch):
    from ladd_ds.training import trainer

    real, loaders = trainer.build_loader, []
    monkeypatch.setattr(trainer, "build_loader", lambda *a, **k: loaders.append(real(*a, **k)) or loaders[-1])
    root = write_root(tmp_path / "data", {"128x128": 16, "64x128": 3})
    sets = ["data.micro_batch_size=4", "optim.grad_accum=2", "data.drop_small_buckets=true", "optim.ema_decay=0"]
    args = train_args(tmp_path, root, *sets)
    out = run_cli(*args, launcher="in-process").stdout
    assert out.count("data.drop_small_buckets: leaving out bucket(s) {'64x128': 3}") == 1, out
    assert "done: step 1" in out
    assert [s.local for s in loaders[0].dataset.streams] == [str(root / "128x128")]


def test_every_bucket_too_small_is_an_error(tmp_path, capsys, no_models):
    root = write_root(tmp_path / "data", {"128x128": 3, "64x128": 2})
    err = cli_error(capsys, *train_args(tmp_path, root, "data.drop_small_buckets=true"))
    assert "every bucket" in err and "{'128x128': 3, '64x128': 2}" in err and "global batch of 4" in err


@pytest.mark.parametrize(
    "bucket, shapes, expected",
    [
        ("128x128", dict(channels=16), ["column 'latent' stores 16 channels", "4 latent channels"]),
        ("120x120", {}, ["latents of 15x15", "patch_size=2"]),
        ("128x128", dict(text_dim=64), ["column 'prompt_embeds' stores width 64", "joint_attention_dim=32"]),
        ("128x128", dict(pooled_dim=8), ["column 'pooled' stores width 8", "pooled_projection_dim=16"]),
    ],
)
def test_stored_shapes_must_fit_the_teacher(tmp_path, capsys, no_models, bucket, shapes, expected):
    root = write_root(tmp_path / "data", {bucket: 8}, **shapes)
    err = cli_error(capsys, *train_args(tmp_path, root))
    assert f"data.path {root}, bucket '{bucket}'" in err and "model.teacher tiny" in err
    for text in expected:
        assert text in err


def write_pairs(path, n, channels=4):
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "latent_w": torch.randn(channels, 16, 16, generator=g),
            "latent_l": torch.randn(channels, 16, 16, generator=g),
            "prompt_embeds": torch.randn(8, 32, generator=g),
            "pooled": torch.randn(16, generator=g),
            "prompt": f"pair {i}",
        }
        for i in range(n)
    ]
    return write_samples(path, rows, layout=PAIRS)


@pytest.mark.parametrize(
    "n, channels, expected",
    [(8, 16, "column 'latent_w' stores 16 channels"), (3, 4, "holds 3 samples, fewer than one global batch of 4")],
)
def test_dpo_checks_its_pairs_before_building_models(tmp_path, capsys, no_models, n, channels, expected):
    pairs = write_pairs(tmp_path / "pairs", n, channels)
    args = ["dpo", "--config", str(DPO_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"data.path={pairs}"]
    err = cli_error(capsys, *args)
    assert f"data.path {pairs}" in err and expected in err


def test_dry_run_reports_the_data_problem(tmp_path):
    """The whole report is printed, and the exit status and last line say that the run could not start."""
    root = write_root(tmp_path / "data", {"128x128": 16, "64x128": 3})
    proc = run_cli(*train_args(tmp_path, root), "--dry-run", launcher="in-process", check=False)
    assert proc.returncode == 2
    assert "data: NOT USABLE, training would stop here:" in proc.stdout and "{'64x128': 3}" in proc.stdout
    assert "stages:" in proc.stdout  # the memory plan after the data line
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ladd-ds train: error: --dry-run: the run could not start: data: ") and "{'64x128': 3}" in last
    out = run_cli(*train_args(tmp_path, root, "data.drop_small_buckets=true"), "--dry-run", launcher="in-process").stdout
    assert "data: 16 samples in" in out and "dropped (data.drop_small_buckets): {'64x128': 3}" in out


def test_remote_data_is_left_to_streaming(tmp_path):
    from ladd_ds.config import load_config
    from ladd_ds.data.schema import LATENTS
    from ladd_ds.training.build import check_mds_data, mds_data_plan

    cfg = load_config(TINY_CONFIG, ["data.source=mds", "data.path=s3://bucket/data", f"data.cache_dir={tmp_path}"])
    assert mds_data_plan(cfg, LATENTS, 1) is None
    check_mds_data(cfg, LATENTS, 1)  # nothing to read: no error


def test_shapes_are_read_from_compressed_shards(tmp_path):
    from ladd_ds.data.checks import first_sample

    columns = {"latent": "ndarray:float16", "prompt_embeds": "ndarray:float32", "pooled": "ndarray:float32", "prompt": "str"}
    with MDSWriter(out=str(tmp_path / "zst"), columns=columns, compression="zstd") as writer:
        for i in range(2):
            writer.write(
                {
                    "latent": np.full((4, 6, 2), i, np.float16),
                    "prompt_embeds": np.zeros((3, 8), np.float32),
                    "pooled": np.zeros(5, np.float32),
                    "prompt": f"p{i}",
                }
            )
    assert not list((tmp_path / "zst").glob("*.mds"))  # only the .mds.zstd shard
    sample = first_sample(tmp_path / "zst")
    assert sample["latent"].shape == (4, 6, 2) and sample["latent"].max() == 0 and sample["pooled"].shape == (5,)
