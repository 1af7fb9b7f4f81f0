"""Diffusion-DPO: the loss by hand, LoRA's reference, the direction of training, and `ladd-ds dpo`
under DeepSpeed (step 0, two ranks against one, resume, full fine-tuning, export)."""

import copy
import json
import math

import pytest
import torch

from ladd_ds.data.schema import PAIRS, validate_mds_dir
from ladd_ds.data.writer import write_samples
from ladd_ds.dpo.loss import dpo_loss, velocity_errors
from ladd_ds.models.flow_model import FlowModel
from ladd_ds.models.lora import adapters_disabled, add_lora, load_lora, lora_config, lora_state_dict, read_lora, save_lora
from ladd_ds.models.registry import build_transformer
from ladd_ds.models.scheduler import DEFAULT_SHIFT
from tests.conftest import REPO, cli_error, copy_run_until, export, mds_samples, read_metrics, run_cli

DPO_CONFIG = REPO / "configs" / "tiny_dpo_cpu.yaml"
LOG2 = math.log(2.0)


def test_velocity_errors_match_hand_computation():
    x0 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    eps = torch.tensor([[[[0.5, 0.0]]], [[[1.0, 1.0]]]])
    v = torch.tensor([[[[0.0, -2.0]]], [[[1.0, 0.0]]]])
    # target eps - x0: [-0.5, -2] and [1, 2]; errors: mean([0.25, 0]) and mean([0, 4])
    torch.testing.assert_close(velocity_errors(v, x0, eps), torch.tensor([0.125, 2.0]))


def test_dpo_loss_matches_hand_computation():
    model_w, ref_w = torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0.6, 0.2, 0.4])
    model_l, ref_l = torch.tensor([0.4, 0.1, 0.3]), torch.tensor([0.3, 0.3, 0.3])
    loss, m = dpo_loss(model_w, model_l, ref_w, ref_l, beta=2.0)
    # -beta/2 * ((m_w - r_w) - (m_l - r_l)) per pair: -(-0.1 - 0.1), -(0 + 0.2), -(-0.3 - 0)
    margins = [0.2, -0.2, 0.3]
    expected = sum(math.log1p(math.exp(-x)) for x in margins) / 3  # -log sigmoid(x)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["dpo/implicit_acc"] == pytest.approx(2 / 3)
    assert m["dpo/reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-5)
    assert m["dpo/reward_w"] == pytest.approx((0.1 + 0.0 + 0.3) / 3, rel=1e-5)
    assert m["dpo/model_err_l"] == pytest.approx(0.8 / 3) and m["dpo/ref_err_w"] == pytest.approx(0.4)


def test_at_the_reference_the_loss_is_log2_and_accuracy_one_half():
    err = torch.tensor([0.3, 0.7])
    loss, m = dpo_loss(err, err + 1, err, err + 1, beta=5000.0)
    assert loss.item() == pytest.approx(LOG2) and m["dpo/implicit_acc"] == 0.5


def tiny_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, 8, 32, generator=g),
        torch.randn(batch, 16, generator=g),
    )


def test_adapters_off_is_the_reference_and_only_lora_trains():
    reference = FlowModel(build_transformer("tiny", seed=0)).eval()
    model = copy.deepcopy(reference)
    trainable = add_lora(model.transformer, lora_config(rank=4, mlp=True))
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"transformer.{n}" for n in trainable}
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), reference(*x), rtol=0, atol=0)  # lora_B starts at zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
        assert (model(*x) - reference(*x)).abs().max() > 1e-3
        with adapters_disabled(model.transformer):
            torch.testing.assert_close(model(*x), reference(*x), rtol=0, atol=0)
        assert (model(*x) - reference(*x)).abs().max() > 1e-3  # adapters are back on


def test_lora_folder_round_trip_and_merge(tmp_path):
    model = build_transformer("tiny", seed=0)
    config = lora_config(rank=4, alpha=8)
    add_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    save_lora(tmp_path / "lora", lora_state_dict(model.state_dict()), config)
    loaded_config, weights = read_lora(tmp_path / "lora")
    assert loaded_config.r == 4 and loaded_config.lora_alpha == 8
    assert all(k.startswith("transformer_blocks.") for k in weights)
    merged = load_lora(build_transformer("tiny", seed=0), tmp_path / "lora", merge=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(FlowModel(merged)(*x), FlowModel(model)(*x), atol=1e-5, rtol=1e-5)
    # diffusers' own loader reads the folder too, with the right alpha (from the file's metadata)
    by_diffusers = build_transformer("tiny", seed=0)
    by_diffusers.load_lora_adapter(tmp_path / "lora", prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(FlowModel(by_diffusers)(*x), FlowModel(model)(*x), atol=1e-6, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_lora(tmp_path)


def test_dpo_training_prefers_the_winner():
    """The sign of the loss: minimizing it must make the model fit winners better than losers,
    relative to the reference (a flipped sign would still lower *a* loss, the wrong way)."""
    torch.manual_seed(0)
    reference = FlowModel(build_transformer("tiny", seed=0)).eval()
    model = copy.deepcopy(reference)
    add_lora(model.transformer, lora_config(rank=4))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x_w, t, embeds, pooled = tiny_inputs(batch=4, seed=1)
    x_l = torch.randn_like(x_w)
    eps = torch.randn_like(x_w)
    x0 = torch.cat([x_w, x_l])
    tt, ee = torch.cat([t, t]), torch.cat([eps, eps])
    xt = (1 - tt[:, None, None, None]) * x0 + tt[:, None, None, None] * ee
    cond = (torch.cat([embeds] * 2), torch.cat([pooled] * 2))
    with torch.no_grad():
        ref_err = velocity_errors(reference(xt, tt, *cond), x0, ee)
    for _ in range(15):
        err = velocity_errors(model(xt, tt, *cond), x0, ee)
        loss, m = dpo_loss(err[:4], err[4:], ref_err[:4], ref_err[4:], beta=100.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = velocity_errors(model(xt, tt, *cond), x0, ee)
    assert loss.item() < LOG2 and m["dpo/implicit_acc"] == 1.0
    assert ((err[:4] - ref_err[:4]) < (err[4:] - ref_err[4:])).all()


# --------------------------------------------------------------------- `ladd-ds dpo` end to end

NUM_PAIRS = 32


def write_random_pairs(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [
        {
            "latent_w": torch.randn(4, 16, 16, generator=g),
            "latent_l": torch.randn(4, 16, 16, generator=g),
            "prompt_embeds": torch.randn(8, 32, generator=g),
            "pooled": torch.randn(16, generator=g),
            "prompt": f"pair {i}",
        }
        for i in range(NUM_PAIRS)
    ]
    return write_samples(path, samples, layout=PAIRS)


COMMON = [
    "logging.progress_bar=false",
    "optim.eps=0.01",  # as in test_multirank: keeps Adam's first steps proportional to the gradient
    "checkpoint.every=2",
]


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    pairs = write_random_pairs(root / "pairs")

    def dpo(name, steps, *sets, nproc=1):
        args = ["dpo", "--config", str(DPO_CONFIG), "--run-dir", str(root / name), "--max-steps", str(steps)]
        for s in [f"data.path={pairs}", *COMMON, *sets]:
            args += ["--set", s]
        launcher = "in-process" if nproc == 1 else "direct"
        (root / f"{name}.log").write_text(run_cli(*args, nproc=nproc, launcher=launcher).stdout)
        return root / name

    runs = {
        "1rank": dpo("1rank", 4, "data.micro_batch_size=8"),
        "2ranks": dpo("2ranks", 4, "data.micro_batch_size=4", nproc=2),
        "full": dpo("full", 2, "data.micro_batch_size=8", "dpo.mode=full", "dpo.lr=1.0e-4"),
    }
    # Resumed from the 1-rank run's step-2 checkpoint (the run as it was after 2 steps).
    copy_run_until(runs["1rank"], root / "resumed", 2)
    runs["resumed"] = dpo("resumed", 4, "data.micro_batch_size=8")
    for name, run_dir in runs.items():
        export(run_dir, root / f"{name}_export")
    return root, runs


def lora_weights(root, name):
    return read_lora(root / f"{name}_export" / "lora")[1]


@pytest.mark.parametrize("name", ["1rank", "full"])
def test_step_zero_loss_is_log2_and_accuracy_one_half(dpo_runs, name):
    _, runs = dpo_runs
    first = read_metrics(runs[name])[0]
    assert first["step"] == 1
    assert first["dpo/loss"] == pytest.approx(LOG2, abs=1e-6)
    assert first["dpo/implicit_acc"] == 0.5
    assert first["dpo/model_err_w"] == pytest.approx(first["dpo/ref_err_w"], abs=1e-6)
    later = read_metrics(runs[name])[-1]
    assert later["dpo/loss"] != pytest.approx(LOG2, abs=1e-6)  # the model has moved off the reference


@pytest.mark.multiproc
def test_two_ranks_zero3_equal_one_process(dpo_runs):
    root, runs = dpo_runs
    ds_config = json.loads((runs["2ranks"] / "ds_config_model.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3
    one, two = lora_weights(root, "1rank"), lora_weights(root, "2ranks")
    assert one.keys() == two.keys() and any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    for a, b in zip(read_metrics(runs["1rank"]), read_metrics(runs["2ranks"])):
        assert a["dpo/loss"] == pytest.approx(b["dpo/loss"], rel=1e-4, abs=1e-6)


def test_resume_equals_uninterrupted(dpo_runs):
    root, runs = dpo_runs
    full, resumed = lora_weights(root, "1rank"), lora_weights(root, "resumed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5)
    assert "step-00000002 at step 2" in (root / "resumed.log").read_text()  # it did resume
    steps = [m["step"] for m in read_metrics(runs["resumed"])]
    assert steps == [1, 2, 3, 4]  # logged once each, no repeats after the restart
    for a, b in zip(read_metrics(runs["1rank"]), read_metrics(runs["resumed"])):
        assert a["dpo/loss"] == pytest.approx(b["dpo/loss"], rel=1e-5, abs=1e-7)


def test_export_writes_lora_and_full_model(dpo_runs):
    root, runs = dpo_runs
    info = json.loads((root / "1rank_export" / "ladd_dpo.json").read_text())
    assert info["mode"] == "lora" and info["step"] == 4 and not info["merged"]
    assert not (root / "1rank_export" / "transformer").exists()
    assert (root / "full_export" / "transformer" / "config.json").is_file()
    assert not (root / "full_export" / "lora").exists()
    # --merge: the model with the LoRA folded in equals base + adapter
    run_cli(
        "export", "--run", str(runs["1rank"]), "--out", str(root / "merged"), "--merge", "--dtype", "fp32", launcher="in-process"
    )
    from diffusers import SD3Transformer2DModel

    merged = FlowModel(SD3Transformer2DModel.from_pretrained(root / "merged", subfolder="transformer"))
    adapted = load_lora(build_transformer("tiny", seed=0), root / "1rank_export" / "lora")
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(*x), FlowModel(adapted)(*x), atol=1e-5, rtol=1e-5)


def test_dpo_rejects_latent_data_with_a_clear_error(tmp_path, capsys):
    from ladd_ds.data.writer import write_random_latents

    latents = write_random_latents(
        tmp_path / "latents", num_samples=8, latent_shape=(4, 16, 16), text_len=8, text_dim=32, pooled_dim=16, seed=0
    )
    args = ["dpo", "--config", str(DPO_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"data.path={latents}"]
    err = cli_error(capsys, *args)
    assert "latent_w" in err and "ladd-ds pairs" in err
    assert validate_mds_dir(latents)["num_samples"] == 8  # the data is untouched


# --------------------------------------------------------------------- preference pairs


def brightness_scorer(scale: float = 1.0):
    """A test scorer (named in the config as tests.test_dpo:brightness_scorer): mean brightness."""
    return lambda images, prompts: scale * images.flatten(1).mean(dim=1)


def read_pairs(path):
    """Every pair of a `ladd-ds pairs` output (all its buckets), in prompt order."""

    from ladd_ds.data.loader import clean_stale_shared_memory_once

    clean_stale_shared_memory_once()
    rows = []
    for bucket in json.loads((path / "manifest.json").read_text())["buckets"]:
        rows += [dict(s) for s in mds_samples(path / bucket)]
    return sorted(rows, key=lambda r: r["index"])


PAIR_PROMPTS = ["a red seven in the top left", "a blue two in the bottom right", "a green one in the top right"]


def pairs_args(teacher, prompts, out, *extra):
    sets = [
        f"model.teacher={teacher}",
        f"pairs.prompts={prompts}",
        "pairs.scorer=tests.test_dpo:brightness_scorer",
        "pairs.scorer_args={scale: 2.0}",
        "pairs.samples_per_prompt=3",
        "pairs.steps=2",
        "pairs.height=16",
        "pairs.width=16",
        "pairs.batch_size=3",  # one prompt per sampling batch: batches do not change samples
        "pairs.part_size=1",
        *extra,
    ]
    return ["pairs", "--config", str(DPO_CONFIG), "--out", str(out), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def pair_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("pair_prompts") / "prompts.txt"
    path.write_text("\n".join(PAIR_PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference_pairs(small_demo_teacher, pair_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    run_cli(*pairs_args(small_demo_teacher, pair_prompts, out), launcher="in-process")
    return out


def test_pairs_keep_the_best_and_the_worst_sample(reference_pairs, small_demo_teacher, pair_prompts):
    from ladd_ds.models.codec import PixelUnshuffleCodec

    summary = json.loads((reference_pairs / "pairs.json").read_text())
    assert summary["pairs"] == 3 and summary["skipped"] == 0 and summary["mean_score_gap"] > 0
    assert validate_mds_dir(reference_pairs / "16x16", PAIRS)["num_samples"] == 3
    codec = PixelUnshuffleCodec(2)
    samples = read_pairs(reference_pairs)
    assert [s["prompt"] for s in samples] == PAIR_PROMPTS
    gaps = []
    for s in samples:
        assert s["score_w"] > s["score_l"] and s["latent_w"].shape == (12, 16 // 2, 16 // 2)  # pixel-unshuffle 2
        for key, score in (("latent_w", s["score_w"]), ("latent_l", s["score_l"])):
            image = ((codec.decode(torch.tensor(s[key]).float()[None]) + 1) / 2).clamp(0, 1)
            assert 2.0 * image.mean().item() == pytest.approx(score, abs=2e-3)  # fp16 latents
        gaps.append(s["score_w"] - s["score_l"])
    assert summary["mean_score_gap"] == pytest.approx(sum(gaps) / len(gaps))
    out = run_cli(*pairs_args(small_demo_teacher, pair_prompts, reference_pairs), launcher="in-process").stdout
    assert "nothing to do" in out


def assert_same_pairs(got, want):
    """The same pairs, the latents within round-off (made by processes of other thread counts)."""
    assert [(s["prompt"], s["index"]) for s in got] == [(s["prompt"], s["index"]) for s in want]
    for g, w in zip(got, want):
        for key in ("latent_w", "latent_l"):
            torch.testing.assert_close(torch.tensor(g[key]).float(), torch.tensor(w[key]).float(), atol=2e-3, rtol=1e-3)


@pytest.mark.multiproc
def test_pairs_on_two_ranks_and_after_a_kill_are_those_of_one_uninterrupted_rank(
    reference_pairs, small_demo_teacher, pair_prompts, tmp_path, monkeypatch
):
    two = tmp_path / "two"
    run_cli(*pairs_args(small_demo_teacher, pair_prompts, two), nproc=2)
    assert_same_pairs(read_pairs(two), read_pairs(reference_pairs))  # another batch split
    assert json.loads((two / "pairs.json").read_text())["pairs"] == 3

    killed = tmp_path / "killed"
    monkeypatch.setenv("LADD_DS_INJECT_FAULTS", "kill@2")  # SIGKILL before committing the second part
    assert run_cli(*pairs_args(small_demo_teacher, pair_prompts, killed), check=False).returncode != 0
    monkeypatch.delenv("LADD_DS_INJECT_FAULTS")
    assert not (killed / "manifest.json").exists() and len(list(killed.glob("16x16/part-*"))) == 1
    out = run_cli(*pairs_args(small_demo_teacher, pair_prompts, killed), launcher="in-process").stdout
    assert "1 already done, 2 to generate" in out
    assert_same_pairs(read_pairs(killed), read_pairs(reference_pairs))
    changed = run_cli(*pairs_args(small_demo_teacher, pair_prompts, killed, "pairs.steps=3"), check=False, launcher="in-process")
    assert changed.returncode == 2 and "was started with other settings" in changed.stderr


def import_pairs_memory(tmp_path, name: str, count: int, images) -> tuple[float, int]:
    """`ladd-ds pairs --import-pairs` of `count` pairs (distinct prompts over a few images): how far
    host memory rose while generating (as the command reports it), and the bytes of its shards."""
    import re

    prefs = tmp_path / f"{name}.jsonl"
    with prefs.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"preference {i}", "winner": f"{i % 4}.png", "loser": f"{(i + 1) % 4}.png"}) + "\n")
    out = tmp_path / name
    sets = ["codec.vae=tiny", "pairs.height=16", "pairs.width=16", "pairs.batch_size=25", "pairs.part_size=125"]
    # Wide text rows: 256 T5 tokens make a pair ~4x the bytes of 8 tokens for ~1.7x the encoding
    # time (tiny encoders, 2-core CPU), so a tenth of the pairs shows the same growth. Batches of 25
    # keep T5's (B, heads, 256, 256) attention scores (~26 MB) below the bytes the test compares.
    sets += ["text.max_sequence_length=256"]
    args = ["pairs", "--config", str(DPO_CONFIG), "--import-pairs", str(prefs), "--images", str(images), "--out", str(out)]
    stdout = run_cli(*args, *[a for s in sets for a in ("--set", s)]).stdout
    assert json.loads((out / "pairs.json").read_text())["pairs"] == count
    rose = float(re.search(r"host memory rose by ([\d.]+) MiB at its peak while generating", stdout)[1]) * 2**20
    return rose, sum(f.stat().st_size for f in out.rglob("shard.*"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_importing_20_parts_of_pairs_holds_a_part_in_memory_not_the_set(tmp_path):
    """Host memory while importing 20 parts of pairs (2,500) rises as much as while importing 2
    (a part, the models' working memory), far less than the bytes written; before, every pair was
    held in memory until one write at the end."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    rose_2, written_2 = import_pairs_memory(tmp_path, "2parts", 250, images)
    rose_20, written_20 = import_pairs_memory(tmp_path, "20parts", 2_500, images)
    assert written_20 - written_2 > 80 * 2**20  # what holding the set in memory would add, at least
    assert rose_20 - rose_2 < 0.1 * (written_20 - written_2), (rose_2 / 2**20, rose_20 / 2**20)
    assert rose_20 < 0.75 * written_20


def test_scorer_errors_name_the_key():
    from ladd_ds.config import ConfigError
    from ladd_ds.generate.pairs import load_scorer, pair_from_scores

    with pytest.raises(ConfigError, match="pairs.scorer: cannot import"):
        load_scorer("tests.test_dpo:no_such_scorer", {})
    with pytest.raises(ConfigError, match="pairs.scorer_args"):
        load_scorer("tests.test_dpo:brightness_scorer", {"colour": 1})
    assert pair_from_scores(torch.tensor([0.2, 0.9, 0.1, 0.5])) == (1, 2)


def test_import_pairs_encodes_a_preference_set(tmp_path):
    import numpy as np
    from PIL import Image

    from ladd_ds.config import load_config
    from ladd_ds.generate.encode import load_cropped
    from ladd_ds.generate.pairs import import_pairs
    from ladd_ds.models.codec import load_codec

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"prompt": "a cat", "winner": "0.png", "loser": "1.png"})
        + "\n"
        + json.dumps({"prompt": "a dog", "winner": "3.png", "loser": "2.png"})
        + "\n"
    )
    cfg = load_config(DPO_CONFIG, ["codec.vae=tiny", "pairs.height=64", "pairs.width=64"])
    summary = import_pairs(cfg, preferences=prefs, images=images, out=tmp_path / "pairs")
    assert summary["pairs"] == 2
    codec = load_codec("tiny", 4, seed=cfg.synth.seed)
    samples = read_pairs(tmp_path / "pairs")
    assert [s["prompt"] for s in samples] == ["a cat", "a dog"]
    with torch.no_grad():
        expected = codec.encode(load_cropped(str(images / "3.png"), 64, 64)[None])[0]
    torch.testing.assert_close(torch.tensor(samples[1]["latent_w"]).float(), expected, atol=2e-3, rtol=1e-3)
    prefs.write_text(json.dumps({"prompt": "x", "winner": "0.png", "loser": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"prefs.jsonl:1: loser image missing.png"):
        import_pairs(cfg, preferences=prefs, images=images, out=tmp_path / "pairs2")
    assert not (tmp_path / "pairs2").exists()


def test_dry_run_counts_lora_parameters(capsys, tmp_path):
    from ladd_ds.cli import main

    pairs = write_random_pairs(tmp_path / "pairs")
    args = ["dpo", "--config", str(DPO_CONFIG), "--dry-run", "--set", f"data.path={pairs}"]
    assert main([*args, "--world-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"data: {NUM_PAIRS} samples in {pairs}" in printed
    model = build_transformer("tiny", seed=0)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(model.get_parameter(n).numel() for n in add_lora(model, lora_config(rank=4)))
    assert f"{total + trained:,} parameters, {trained:,} trained" in printed
    assert "model: ZeRO-3" in printed and "reference" not in printed
    assert f"shifted by {DEFAULT_SHIFT:g} (model.teacher sampling shift)" in printed  # the tiny preset's: SD3's
    assert main([*args, "--set", "dpo.mode=full", "--set", "dpo.time_shift=1.5"]) == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "shifted by 1.5 (dpo.time_shift)" in printed
    # Without the pairs (the config's data.path does not exist here) the report is printed and the run cannot start.
    assert main(["dpo", "--config", str(DPO_CONFIG), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "data: NOT USABLE" in captured.out and "could not start: data: " in captured.err and "ladd-ds pairs" in captured.err


def test_sample_applies_a_lora(tmp_path, small_demo_teacher):
    import numpy as np

    from ladd_ds.sampling import run_sample

    teacher = small_demo_teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven in the top left\n")
    transformer = build_transformer(str(teacher))
    config = lora_config(rank=4)
    add_lora(transformer, config)
    save_lora(tmp_path / "zero_lora", lora_state_dict(transformer.state_dict()), config)  # lora_B = 0
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=1.0)  # the demo preset's small teacher needs a large perturbation to show
    save_lora(tmp_path / "lora", lora_state_dict(transformer.state_dict()), config)

    def images(name, lora=None):
        run_sample(
            str(teacher),
            prompts_file=str(prompts),
            steps=4,
            cfg=3.0,
            seed=0,
            out=str(tmp_path / name),
            per_prompt=2,
            size="16x16",
            lora=lora,
        )
        return np.load(tmp_path / f"{name}.npz")["images"]

    base = images("base")
    assert np.array_equal(images("zero", tmp_path / "zero_lora"), base)  # a no-op adapter changes nothing
    assert np.abs(images("lora", tmp_path / "lora").astype(int) - base.astype(int)).max() > 10
