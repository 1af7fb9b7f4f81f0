"""`ladd-ds evaluate` end to end on tiny models with tiny metric networks saved as the files a user
passes: the numbers are what the stored features give under an independent formula, 2 ranks give
what 1 rank gives, finished cells are reused, other settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, export, run_cli
from metric_nets import clip_folder, dinov2_folder, inception_weights
from PIL import Image

PROMPTS = [
    ("a red 3 on the left", "16x16"),
    ("a blue 7 at the top", "32x16"),
    ("a green 1 on the right", "16x16"),
    ("a white 0 at the bottom", "32x16"),
    ("a yellow 5", "16x16"),
]


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric_nets")
    clip = clip_folder(root / "clip")
    _align_clip(clip)
    return {"dino": dinov2_folder(root / "dino"), "clip": clip, "inception": inception_weights(root / "inception.pth")}


def _align_clip(folder: Path) -> None:
    """Random CLIP embeddings of images and texts are about orthogonal, and CLIPScore clips
    negative scores to 0: a common offset after both final norms (and one projection for both)
    gives scores around 50-90 that still differ per image and prompt."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder)
    offset = torch.linspace(-1.0, 1.0, model.config.vision_config.hidden_size) * 1.5
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.copy_(offset)
        model.text_model.final_layer_norm.bias.copy_(offset)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def student(tiny_ladd_run, tmp_path_factory) -> Path:
    return export(tiny_ladd_run, tmp_path_factory.mktemp("student") / "student")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_inputs")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "bucket": b}) + "\n" for p, b in PROMPTS))
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):  # two sizes: the reference is read in runs of one size
        size = (16, 16) if i < 4 else (20, 24)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    return {"prompts": prompts, "reference": reference}


def _student_args(student, inputs, nets, out, *extra) -> list[str]:
    return [
        "evaluate", "--model", str(student), "--steps", "1,4", "--prompts", str(inputs["prompts"]), "--per-prompt", "2",
        "--reference", str(inputs["reference"]), "--features", str(nets["dino"]), "--clip", str(nets["clip"]),
        "--precision", "bf16", "--batch-size", "1", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_and_two_ranks(student, inputs, nets, tmp_path_factory) -> tuple[Path, Path]:
    """The same bf16 evaluation on 1 and on 2 ranks (subprocesses of one thread each: the same
    kernels; batch size 1: the same shapes whichever rank samples an image)."""
    root = tmp_path_factory.mktemp("evaluate")
    run_cli(*_student_args(student, inputs, nets, root / "one"))
    run_cli(*_student_args(student, inputs, nets, root / "two"), nproc=2)
    return root / "one", root / "two"


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to feature sets (Heusel et al. 2017) in numpy:
    |mu1 - mu2|^2 + tr(S1 + S2) - 2 tr((S1 S2)^1/2), the last trace as the sum of the square roots
    of S1 S2's eigenvalues (the covariances of a few samples are singular)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * root_trace)


def _cell(out: Path, steps: int, role: str = "model-student") -> dict:
    return torch.load(out / "cells" / f"{role}-{steps}steps" / "features.pt", weights_only=True)


def test_every_cell_and_bucket_is_measured_and_fd_is_the_formula(one_and_two_ranks, inputs):
    out, _ = one_and_two_ranks
    results = _results(out)
    assert [(c["cell"]["steps"], c["nfe"]) for c in results["cells"]] == [(1, 1), (4, 4)]
    reference = torch.load(out / "reference_features.pt", weights_only=True)["features"].double().numpy()
    assert len(reference) == 7
    for cell in results["cells"]:
        feats = _cell(out, cell["cell"]["steps"])
        assert set(cell["buckets"]) == {"16x16", "32x16", "all"}
        assert cell["buckets"]["16x16"]["images"] == 6 and cell["buckets"]["32x16"]["images"] == 4
        for bucket in ("16x16", "32x16"):
            row = cell["buckets"][bucket]
            fake = feats[bucket].double().numpy()
            assert row["fd"] == pytest.approx(_frechet(reference, fake), rel=1e-4)
            assert 0 < row["clip"] <= 100 and row["ms_per_image"] > 0 and row["peak_memory_gib"] is None
            assert np.isfinite(row["kid"]) and row["kid_std"] >= 0
            assert feats["grid"][bucket].dtype == torch.uint8
        both = np.concatenate([feats["16x16"].double().numpy(), feats["32x16"].double().numpy()])
        assert cell["buckets"]["all"]["fd"] == pytest.approx(_frechet(reference, both), rel=1e-4)
        clip = cell["buckets"]
        assert clip["all"]["clip"] == pytest.approx((6 * clip["16x16"]["clip"] + 4 * clip["32x16"]["clip"]) / 10)
    # The 1-step and 4-step students make different images: the metrics see them.
    fds = [c["buckets"]["all"]["fd"] for c in results["cells"]]
    assert fds[0] != fds[1]
    report = (out / "report.md").read_text()
    assert "## 16x16" in report and "## all buckets" in report and "dinov2" in report
    for name in ("grid_16x16.png", "grid_32x16.png", "plots/fd.png", "plots/kid.png", "plots/clip.png"):
        assert (out / name).is_file(), name
    grid = np.asarray(Image.open(out / "grid_16x16.png"))
    # grid prompts in 16x16: prompts 0 and 2 (of the first 4), 2 images each -> 4 rows; 2 cells
    assert grid.shape[0] > grid.shape[1]


def test_two_ranks_give_the_numbers_of_one(one_and_two_ranks):
    one, two = (_results(out) for out in one_and_two_ranks)
    assert len(one["cells"]) == len(two["cells"]) == 2
    for a, b in zip(one["cells"], two["cells"]):
        assert a["cell"] == b["cell"] and a["nfe"] == b["nfe"]
        for bucket, row in a["buckets"].items():
            for key in ("fd", "kid", "kid_std", "clip", "images"):
                assert b["buckets"][bucket][key] == pytest.approx(row[key], rel=1e-5, abs=1e-9), (a["cell"]["label"], bucket, key)
        fa, fb = (_cell(out, a["cell"]["steps"]) for out in one_and_two_ranks)
        for bucket in ("16x16", "32x16"):
            torch.testing.assert_close(fa[bucket], fb[bucket])  # every image, in the same order
            assert torch.equal(fa["grid"][bucket], fb["grid"][bucket])


def test_finished_cells_are_reused_and_other_settings_refused(one_and_two_ranks, student, inputs, nets, capsys):
    out, _ = one_and_two_ranks
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    proc = run_cli(*_student_args(student, inputs, nets, out, "--steps", "1,2,4"), launcher="in-process")
    assert proc.stdout.count("finished before, reused") == 2
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert {k: after[k] for k in before} == before  # the finished cells untouched
    assert set(after) - set(before) == {"model-student-2steps"}
    assert [c["cell"]["steps"] for c in _results(out)["cells"]] == [1, 2, 4]
    # another seed: other images of every cell; the folder is kept unless --overwrite
    err = cli_error(capsys, *_student_args(student, inputs, nets, out, "--seed", "1"))
    assert "--overwrite" in err and str(out) in err
    # on 2 ranks every rank stops with rank 0's refusal (none waits at a barrier for it)
    proc = run_cli(*_student_args(student, inputs, nets, out, "--seed", "1"), nproc=2, check=False, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("--overwrite") == 2, proc.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == after


def test_bad_inputs_are_refused_before_sampling(student, inputs, nets, tmp_path, capsys):
    args = ["evaluate", "--model", str(student), "--prompts", str(inputs["prompts"]), "--out", str(tmp_path / "o")]
    assert "--features" in cli_error(capsys, *args, "--metrics", "fd", "--reference", str(inputs["reference"]))
    assert "--clip" in cli_error(capsys, *args, "--metrics", "clip")
    assert "unknown" in cli_error(capsys, *args, "--metrics", "fid")
    both = cli_error(capsys, *args, "--reference", str(inputs["reference"]), "--reference-model", str(student))
    assert "--reference-model" in both
    assert "multiples of 16" in cli_error(capsys, *args, "--sizes", "24x24")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    theirs = cli_error(capsys, *args[:-1], str(tmp_path / "theirs"))
    assert "did not write" in theirs and (tmp_path / "theirs" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()


def test_teacher_rows_against_its_own_samples_with_fid_inception_weights(small_demo_teacher, nets, tmp_path):
    """fp32; the teacher at 2 and 4 steps with CFG, FD/KID (FID's Inception-v3 from its weights
    file) against the teacher's own 4-step samples under other seeds."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{p}\n" for p, _ in PROMPTS))
    out = tmp_path / "out"
    args = [
        "evaluate", "--teacher", str(small_demo_teacher), "--teacher-steps", "2,4", "--prompts", str(prompts),
        "--sizes", "16x16", "--features", str(nets["inception"]), "--precision", "fp32", "--out", str(out),
    ]  # fmt: skip
    run_cli(*args, launcher="in-process")
    results = _results(out)
    assert [(c["cell"]["steps"], c["nfe"]) for c in results["cells"]] == [(2, 4), (4, 8)]  # CFG: two calls a step
    assert results["reference"].startswith("reference: teacher, 4 steps")
    assert "Inception-v3" in results["feature_space"]
    reference, own = _cell(out, 4, "reference-teacher")["16x16"], _cell(out, 4, "teacher-teacher")["16x16"]
    assert reference.shape == own.shape == (5, 2048) and not torch.equal(reference, own)  # other seeds
    row = results["cells"][1]["buckets"]["16x16"]
    assert row["fd"] == pytest.approx(_frechet(reference.double().numpy(), own.double().numpy()), rel=1e-4)
    assert "clip" not in row  # no --clip: not measured


def test_jobs_blocks_and_seeds(tmp_path):
    from ladd_ds.core.errors import InputError
    from ladd_ds.quality.jobs import load_jobs, my_block

    items = list(range(11))
    for world in (1, 2, 3, 4):
        blocks = [my_block(items, of_rank=r, world=world) for r in range(world)]
        assert sum(blocks, []) == items and max(map(len, blocks)) - min(map(len, blocks)) <= 1
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "bucket": "32x16"}\n\n{"prompt": "b", "seed": 7}\n{"prompt": "c", "bucket": "32x16"}\n')
    jobs = load_jobs(str(prompts), sizes=None, per_prompt=2, seed=3, default="16x16")
    assert [(j.bucket, j.prompt, j.number) for j in jobs] == [
        ("32x16", "a", 0), ("32x16", "a", 1), ("32x16", "c", 0), ("32x16", "c", 1), ("16x16", "b", 0), ("16x16", "b", 1)
    ]  # fmt: skip
    assert len({j.seed for j in jobs}) == 6
    other = load_jobs(str(prompts), sizes=None, per_prompt=2, seed=4, default="16x16")
    # a prompt's own seed holds whatever --seed is; the others follow --seed
    assert [j.seed for j in other if j.prompt == "b"] == [j.seed for j in jobs if j.prompt == "b"]
    assert not {j.seed for j in other if j.prompt != "b"} & {j.seed for j in jobs}
    sized = load_jobs(str(prompts), sizes=["16x16", "16x32"], per_prompt=1, seed=3, default="8x8")
    assert [j.bucket for j in sized] == ["16x16"] * 3 + ["16x32"] * 3
    prompts.write_text('{"prompt": "a", "bucket": "wide"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:1: bucket wide: expected HEIGHTxWIDTH"):
        load_jobs(str(prompts), sizes=None, per_prompt=1, seed=0, default="16x16")
