"""Samplers, latent codecs and `ladd-ds sample`."""

import json

import numpy as np
import pytest
import torch

from ladd_ds.cli import main
from ladd_ds.models.codec import PixelUnshuffleCodec, VAECodec, codec_factor, load_codec
from ladd_ds.models.vae import build_tiny_vae
from ladd_ds.sampling import (
    TrainedTimes,
    ladd_sample,
    load_sampling_model,
    network_evaluations,
    student_schedule,
    trained_step_counts,
)
from tests.conftest import run_cli


def test_student_schedule_matches_the_trained_timesteps():
    assert student_schedule(4) == [1.0, 0.75, 0.5, 0.25]
    assert student_schedule(2) == [1.0, 0.5]
    assert student_schedule(1) == [1.0]
    with pytest.raises(ValueError):
        student_schedule(0)
    trained = TrainedTimes((1.0, 0.75, 0.5, 0.25))  # an export from before the probabilities were recorded
    assert trained_step_counts(trained) == [1, 2, 4]
    assert student_schedule(4, trained) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(
        ValueError,
        match=r"--steps 3: the student was trained on t in \[1.0, 0.75, 0.5, 0.25\], which gives "
        r"samples of \[1, 2, 4\] steps; 3 steps would use the untrained t = \[0.667, 0.333\]",
    ):
        student_schedule(3, trained)


class PerfectModel:
    """Predicts the velocity that maps any x_t exactly to `target`; records its inputs."""

    def __init__(self, target):
        self.target, self.calls = target, []

    def __call__(self, x, t, embeds, pooled):
        self.calls.append((x.clone(), t.clone()))
        return (x - self.target) / t.view(-1, 1, 1, 1)


def test_ladd_sampler_renoises_the_prediction_with_fresh_noise():
    target = torch.randn(2, 12, 4, 4)
    noise = torch.randn(2, 12, 4, 4)
    model = PerfectModel(target)
    out = ladd_sample(model, None, None, noise, [1.0, 0.5], seeds=[3, 4])
    torch.testing.assert_close(out, target)
    (x1, t1), (x2, t2) = model.calls
    torch.testing.assert_close(x1, noise)
    assert t1.tolist() == [1.0, 1.0] and t2.tolist() == [0.5, 0.5]
    fresh = (x2 - 0.5 * target) / 0.5  # x_t = (1 - t) x0 + t eps
    assert not torch.allclose(fresh, noise)  # new noise, not the initial one
    assert fresh.std().item() == pytest.approx(1.0, abs=0.25)
    again = PerfectModel(target)
    ladd_sample(again, None, None, noise, [1.0, 0.5], seeds=[3, 4])
    torch.testing.assert_close(again.calls[1][0], x2)  # seeded: reproducible


def test_network_evaluations_count_cfg_twice():
    assert network_evaluations("teacher", 50, 3.0) == 100
    assert network_evaluations("teacher", 4, 1.0) == 4
    assert network_evaluations("student", 4, 1.0) == 4


def test_codecs():
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    codec = load_codec("pixel-unshuffle", 12)
    assert isinstance(codec, PixelUnshuffleCodec) and codec.factor == codec_factor("pixel-unshuffle") == 2
    torch.testing.assert_close(codec.decode(codec.encode(image)), image)
    vae = VAECodec(build_tiny_vae(4))
    assert vae.factor == codec_factor("tiny") == 8
    assert vae.encode(image).shape == (2, 4, 4, 6) and vae.decode(vae.encode(image)).shape == image.shape
    with pytest.raises(ValueError, match="12 channels"):
        load_codec("pixel-unshuffle", 16)


@pytest.fixture
def teacher_folder(small_demo_teacher):
    return small_demo_teacher


def test_sample_command_on_a_teacher_folder(teacher_folder, tmp_path):
    sm = load_sampling_model(teacher_folder)
    assert sm.kind == "teacher" and sm.factor == 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven in the top left\na blue one in the bottom right\n")
    out = tmp_path / "grid"
    args = ["sample", "--model", str(teacher_folder), "--prompts", str(prompts), "--steps", "2", "--cfg", "2"]
    assert main([*args, "--seed", "1", "--per-prompt", "3", "--size", "16x24", "--out", str(out)]) == 0
    data = np.load(out.with_suffix(".npz"))
    assert data["images"].shape == (6, 16, 24, 3) and data["images"].dtype == np.uint8
    assert data["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert list(data["prompts"]) == prompts.read_text().split("\n")[:2]
    assert out.with_suffix(".png").is_file()
    # Same seed, same images; the info file names the codec the folder needs.
    assert main([*args, "--seed", "1", "--per-prompt", "3", "--size", "16x24", "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.load(tmp_path / "again.npz")["images"], data["images"])
    # Without --size: the size the teacher recorded (the demo's square bucket).
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "default")]) == 0
    assert np.load(tmp_path / "default.npz")["images"].shape[1:3] == (16, 16)
    assert json.loads((teacher_folder / "ladd_model.json").read_text())["codec"] == "pixel-unshuffle"
    # --precision bf16: transformer and text encoders in bf16; the images stay close to fp32's.
    bf16 = [*args, "--seed", "1", "--per-prompt", "3", "--size", "16x24", "--precision", "bf16"]
    assert main([*bf16, "--out", str(tmp_path / "bf16")]) == 0
    assert load_sampling_model(teacher_folder, precision="bf16").transformer.dtype == torch.bfloat16
    diff = np.abs(np.load(tmp_path / "bf16.npz")["images"].astype(int) - data["images"].astype(int))
    assert 0 < diff.max() and diff.mean() < 8


def test_sample_command_prints_no_deprecation_noise(teacher_folder, tmp_path):
    """A fresh process (libraries warn some things once per process), in bf16: the transformer
    and the text encoders load in their dtype without the deprecated arguments or a cast that
    diffusers and transformers warn about."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red seven in the top left\n")
    args = ["--steps", "1", "--per-prompt", "1", "--precision", "bf16", "--out", str(tmp_path / "x")]
    err = run_cli("sample", "--model", str(teacher_folder), "--prompts", str(prompts), *args).stderr
    assert "deprecat" not in err.lower() and "Casting directly with `to()`" not in err, err
    assert (tmp_path / "x.png").is_file()


def test_sample_command_errors(teacher_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red seven in the top left\n")
    assert main(["sample", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "x")]) == 2
    assert "expected a ladd-ds export" in capsys.readouterr().err
    bad_size = ["--size", "30x31", "--out", str(tmp_path / "x")]
    assert main(["sample", "--model", str(teacher_folder), "--prompts", str(prompts), *bad_size]) == 2
    assert "multiples of 2" in capsys.readouterr().err
    too_large = ["--size", "32x32", "--out", str(tmp_path / "x")]
    assert main(["sample", "--model", str(teacher_folder), "--prompts", str(prompts), *too_large]) == 2
    assert "cover at most 24 pixels" in capsys.readouterr().err


def test_grid_enlarges_small_images_and_keeps_large_ones():
    from ladd_ds.sampling import image_grid

    small = torch.rand(3, 3, 16, 24)
    grid = image_grid(small, rows=1)  # 16 px -> zoom 4
    assert grid.shape == (2 + 4 * 16 + 2, 2 + 3 * (4 * 24 + 2), 3)
    assert (grid[2 : 2 + 4, 2 : 2 + 4] == grid[2, 2]).all()  # one source pixel -> a 4x4 block
    assert image_grid(small, rows=3, zoom=1).shape == (3 * 18 + 2, 26 + 2, 3)
    assert image_grid(torch.rand(1, 3, 128, 128), rows=1).shape == (132, 132, 3)


def test_steps_default_to_the_teachers_28_and_the_students_trained_maximum(teacher_folder, tiny_ladd_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red seven in the top left\n")
    base = ["sample", "--prompts", str(prompts), "--per-prompt", "1"]
    assert main([*base, "--model", str(teacher_folder), "--out", str(tmp_path / "teacher")]) == 0
    out = capsys.readouterr().out
    assert "--steps 28: a teacher's default" in out and "28 steps, CFG 4.0, 56 NFE/image" in out
    # The tiny run trained t in {1, .75, .5, .25}: its largest schedule is 4 steps (1, .75, .5, .25).
    assert main([*base, "--model", str(tiny_ladd_run), "--out", str(tmp_path / "student")]) == 0
    out = capsys.readouterr().out
    assert "--steps 4: the student's trained maximum" in out and "4 steps, CFG 1.0, 4 NFE/image" in out


@pytest.mark.parametrize("trained, steps", [([1.0, 0.75, 0.5, 0.25], 4), ([1.0, 0.5], 2), ([1.0, 0.6], 1), ([1.0], 1)])
def test_the_student_default_is_the_largest_schedule_of_trained_times(trained, steps):
    from ladd_ds.sampling import SamplingModel, default_steps, student_schedule

    sm = SamplingModel(None, None, None, "student", info={"sampling": {"student_timesteps": trained}})
    assert default_steps(sm)[0] == steps
    student_schedule(steps, sm.trained)  # a trained schedule
    with pytest.raises(ValueError, match="untrained"):
        student_schedule(steps + 1 if steps < 4 else 3, sm.trained)


def test_a_schedule_that_needs_a_time_of_probability_0_is_refused():
    """ladd.student_probs [1, 0, 0, 0] trains t = 1 only: 2 and 4 steps would use times the
    student never saw. A warm-up phase's times count as trained; an export from before the
    probabilities were recorded keeps every recorded time (test_student_schedule_matches_...)."""
    from ladd_ds.config import LADDConfig, load_config
    from ladd_ds.ladd.preview import PREVIEW_STEPS, SamplePreview
    from ladd_ds.models.flow_model import FlowModel
    from ladd_ds.models.registry import build_transformer
    from ladd_ds.sampling import SamplingModel, default_steps
    from tests.conftest import TINY_CONFIG

    ladd = LADDConfig(student_probs=[1.0, 0.0, 0.0, 0.0])
    trained = TrainedTimes.from_config(ladd)
    assert TrainedTimes.from_record(trained.record()) == trained  # what the export writes, read back
    assert trained_step_counts(trained) == [1] and student_schedule(1, trained) == [1.0]
    named = "t in [1.0, 0.75, 0.5, 0.25] with probabilities [1.0, 0.0, 0.0, 0.0] (ladd.student_probs)"
    for steps in (2, 4):
        zero = [round(t, 3) for t in student_schedule(steps) if t not in ladd.student_timesteps[:1]]
        with pytest.raises(ValueError) as e:
            student_schedule(steps, trained)
        assert str(e.value) == (
            f"--steps {steps}: the student was trained on {named}, which gives samples of [1] steps; "
            f"{steps} steps would use the untrained t = {zero} ({zero} had probability 0)"
        )
    sm = SamplingModel(None, None, None, "student", info={"sampling": trained.record()})
    assert default_steps(sm)[0] == 1
    # A warm-up on [0, 0, .5, .5] trains .5 and .25 as well: 2 steps (1, .5) are trained, 4 need .75.
    warm = TrainedTimes.from_config(LADDConfig(student_probs=[1.0, 0, 0, 0], warmup_probs=[0, 0, 0.5, 0.5], warmup_steps=5))
    assert trained_step_counts(warm) == [1, 2] and student_schedule(2, warm) == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"untrained t = \[0.75\] \(\[0.75\] had probability 0\)"):
        student_schedule(4, warm)
    # warmup_probs without warm-up steps never draw.
    assert TrainedTimes.from_config(LADDConfig(student_probs=[1.0, 0, 0, 0], warmup_probs=[0, 0, 0.5, 0.5])) == trained
    # The training preview's grids: 1 and 4 steps by default, 1 step only here.
    for sets, steps in (([], list(PREVIEW_STEPS)), ([f"ladd.student_probs={ladd.student_probs}"], [1])):
        cfg = load_config(TINY_CONFIG, [*sets, "logging.sample_prompts=['a red seven']"])
        preview = SamplePreview(cfg, torch.device("cpu"))
        assert preview.steps == steps
    student = FlowModel(build_transformer("tiny", dtype=torch.bfloat16))
    assert list(preview.grids(student, torch.bfloat16)) == ["samples/student_1step"]


def test_an_export_records_the_probabilities_and_sample_refuses_their_zero_times(tmp_path, capsys):
    """End to end (bf16, `ladd-ds export`'s default dtype): a run trained with student_probs
    [1, 0, 0, 0]; its export records them; `ladd-ds sample --steps 2` is refused before sampling,
    and without --steps it samples its one trained step."""
    from tests.conftest import cli_error, export, train_tiny

    probs = [1.0, 0.0, 0.0, 0.0]
    run_dir = tmp_path / "run"
    train_tiny(run_dir, 1, ["logging.progress_bar=false", f"ladd.student_probs={probs}"], launcher="in-process")
    student = export(run_dir, tmp_path / "export", dtype="bf16")
    assert json.loads((student / "ladd_export.json").read_text())["sampling"]["student_probs"] == probs
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red seven\n")
    base = ["sample", "--model", str(student), "--prompts", str(prompts), "--per-prompt", "1", "--precision", "bf16"]
    err = cli_error(capsys, *base, "--steps", "2", "--out", str(tmp_path / "two"))
    assert f"with probabilities {probs} (ladd.student_probs)" in err and "t = [0.5] ([0.5] had probability 0)" in err
    assert not (tmp_path / "two.png").exists()
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert "--steps 1: the student's trained maximum" in capsys.readouterr().out
    assert (tmp_path / "one.png").is_file()
