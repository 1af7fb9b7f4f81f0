"""LADD for inpainting and editing (`ladd.task`): the condition reaches every network call, a
text-to-image folder is widened on load, and 2 ZeRO-3 ranks train what one process trains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ladd_ds.models.conditioning import CONDITION_COLUMNS, condition_channels
from ladd_ds.models.registry import build_transformer
from tests.conftest import EXACT, GLOBAL_BATCH_8, TINY_CONFIG, cli_error, copy_run_until, export, train_tiny
from tests.test_ladd_steps import make_trainer
from tests.test_task_generation import noisy_condition_weights

C = 4  # the tiny preset's latent channels


def forward(model, x, t=0.6):
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(x.shape[0], 5, model.config.joint_attention_dim, generator=g).to(x.dtype)
    pooled = torch.randn(x.shape[0], model.config.pooled_projection_dim, generator=g).to(x.dtype)
    timestep = torch.full((x.shape[0],), 1000 * t)
    return model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep).sample


@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory):
    """A text-to-image diffusers folder with weights unlike any preset init."""
    folder = tmp_path_factory.mktemp("t2i") / "sd3"
    build_transformer("tiny", seed=5).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def task_teachers(tmp_path_factory, t2i_folder):
    """Per task, a teacher of the task (`ladd.task` refuses a text-to-image one): the t2i folder
    widened and saved, its condition weights made non-zero as training for the task makes them."""
    out = {}
    for task in ("inpaint", "edit"):
        out[task] = tmp_path_factory.mktemp(f"{task}_teacher") / "sd3"
        noisy_condition_weights(build_transformer(str(t2i_folder), task=task), C).save_pretrained(out[task] / "transformer")
    return out


@pytest.mark.parametrize("task, dtype", [("inpaint", torch.float32), ("edit", torch.float32), ("inpaint", torch.bfloat16)])
def test_a_t2i_folder_loads_widened_and_equals_the_original_on_zero_conditions(t2i_folder, task, dtype):
    original = build_transformer(str(t2i_folder), dtype=dtype)
    widened = build_transformer(str(t2i_folder), dtype=dtype, task=task)
    extra = condition_channels(task, C)
    assert widened.config.in_channels == C + extra and widened.config.out_channels == C
    assert torch.equal(widened.pos_embed.proj.weight[:, C:], torch.zeros_like(widened.pos_embed.proj.weight[:, C:]))
    x = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = forward(widened, torch.cat([x, torch.zeros(2, extra, 8, 8, dtype=dtype)], dim=1))
    assert torch.equal(got, forward(original, x))
    # The widened preset is the t2i preset of that seed with zero condition weights.
    preset = build_transformer("tiny", seed=0, dtype=dtype, task=task)
    assert torch.equal(
        forward(preset, torch.cat([x, torch.ones(2, extra, 8, 8, dtype=dtype)], 1)),
        forward(build_transformer("tiny", dtype=dtype), x),
    )


def test_a_model_of_another_task_is_refused(tmp_path):
    from ladd_ds.core.errors import InputError

    folder = tmp_path / "edit_model"
    build_transformer("tiny", task="edit").save_pretrained(folder / "transformer")
    assert build_transformer(str(folder), task="edit").config.in_channels == 2 * C  # kept as it is
    with pytest.raises(InputError, match="is an edit transformer .* ladd.task is 'inpaint'"):
        build_transformer(str(folder), task="inpaint")


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_task_run_refuses_a_teacher_not_of_its_task_before_building(
    tmp_path, t2i_folder, task_teachers, capsys, monkeypatch, dry_run
):
    """Widened, a text-to-image teacher's condition weights are zero and frozen: its features and
    targets would ignore the condition for the whole run. `ladd-ds train` (and --dry-run) refuses
    it, and a teacher of the other task, before any model is built; a text-to-image student is
    widened (the runs below train one)."""
    from ladd_ds.config import load_config
    from ladd_ds.ladd import build
    from ladd_ds.methods import method_for

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the teacher was checked")

    monkeypatch.setattr(build, "build_flow_model", no_build)
    base = ["train", "--config", str(TINY_CONFIG), "--set", f"run.run_dir={tmp_path / 'run'}", "--set", "ladd.task=inpaint"]
    base += ["--dry-run"] if dry_run else []
    for teacher, have in ((t2i_folder, "t2i"), ("tiny", "t2i"), (task_teachers["edit"], "edit")):
        err = cli_error(capsys, *base, "--set", f"model.teacher={teacher}")
        assert f"model.teacher {teacher} is a {have} transformer; ladd.task=inpaint needs a teacher trained for inpaint" in err
        assert f"in_channels {2 * C + 1} = latent + condition channels, this one has {condition_channels(have, C) + C}" in err
        assert "`ladd-ds pretrain-teacher --task inpaint`" in err
    assert not (tmp_path / "run").exists()
    sets = [f"model.teacher={task_teachers['inpaint']}", f"model.student={t2i_folder}", "ladd.task=inpaint"]
    cfg = load_config(TINY_CONFIG, sets)
    method_for(cfg, "train").check_config(cfg)  # a teacher of the task, a t2i student: accepted


@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_every_student_and_teacher_call_gets_the_batchs_condition(tmp_path, distributed_world_of_one, task_teachers, task):
    """G step (student; teacher as discriminator, whose velocity is also the distillation target)
    and D step (recomputed fakes; reals and fakes in one 2B teacher call): each input is the noisy
    latent followed by the batch's condition channels."""
    sets = [f"model.teacher={task_teachers[task]}", f"ladd.task={task}", "ladd.distill_weight=1.0", "ladd.reuse_fakes=false"]
    trainer = make_trainer(tmp_path, *sets)
    method = trainer.method
    assert type(method).__name__ == "ConditionedLADDMethod"
    batch = method.to_device(next(trainer.batches))
    condition = torch.cat([batch[c] for c in CONDITION_COLUMNS[task]], dim=1)  # (B, extra, h, w)
    assert condition.shape[1] == condition_channels(task, C)
    seen = []

    def record(name, module):
        def hook(_, args):
            x = args[0]
            seen.append((name, x.shape[1], torch.equal(x[:, C:], condition.repeat(x.shape[0] // len(condition), 1, 1, 1))))

        return module.register_forward_pre_hook(hook)

    hooks = [record("student", method.engines.student.module), record("teacher", method.engines.teacher.module)]
    method.train_step([batch], 0)
    for h in hooks:
        h.remove()
    names = [name for name, _, _ in seen]
    assert names.count("student") == 2 and names.count("teacher") == 2
    assert all(channels == C + condition.shape[1] and same for _, channels, same in seen), seen


def sets_for(task, teacher, student, nproc, *extra):
    models = [f"model.teacher={teacher}", f"model.student={student}"]
    return [*EXACT, *GLOBAL_BATCH_8[nproc], *models, f"ladd.task={task}", "ladd.distill_weight=1.0", *extra]


STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, t2i_folder, task_teachers):
    """Per task: 1 rank and 2 ZeRO-3 ranks, the task's teacher and a student from the t2i folder
    (widened on load), a checkpoint every 2 steps; the 2-rank inpaint run resumed from step 2."""
    root = tmp_path_factory.mktemp("conditioned")
    out = {}
    for task in ("inpaint", "edit"):
        for nproc in (1, 2):
            run_dir = root / f"{task}_{nproc}"
            sets = sets_for(task, task_teachers[task], t2i_folder, nproc, "checkpoint.every=2")
            # The one-process reference in this process (what it computes is compared, not how it starts).
            train_tiny(run_dir, STEPS, sets, nproc=nproc, launcher="in-process" if nproc == 1 else "direct")
            out[task, nproc] = export(run_dir, root / f"{task}_{nproc}_export", step=STEPS)
    resumed = copy_run_until(root / "inpaint_2", root / "inpaint_2_resumed", 2)
    train_tiny(resumed, STEPS, sets_for("inpaint", task_teachers["inpaint"], t2i_folder, 2, "checkpoint.every=2"), nproc=2)
    out["resumed"] = export(resumed, root / "resumed_export", step=STEPS)
    return out


def weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"), load_file(
        folder / "discriminator" / "heads.safetensors"
    )


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_two_zero3_ranks_equal_one_process_and_the_export_loads(runs, task, t2i_folder):
    from diffusers import SD3Transformer2DModel

    (one, one_heads), (two, two_heads) = weights(runs[task, 1]), weights(runs[task, 2])
    for got, want in ((two, one), (two_heads, one_heads)):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{task} {key}: {m}")
    # The student learned to read its condition: the zero-initialised channels moved.
    grown = one["pos_embed.proj.weight"][:, C:]
    assert grown.abs().max() > 50 * 1e-5
    model = SD3Transformer2DModel.from_pretrained(runs[task, 2], subfolder="transformer")
    assert model.config.in_channels == C + condition_channels(task, C) and model.config.out_channels == C
    assert torch.equal(model.state_dict()["pos_embed.proj.weight"], two["pos_embed.proj.weight"])
    info = json.loads((runs[task, 2] / "ladd_export.json").read_text())
    assert info["sampling"]["task"] == task


@pytest.mark.multiproc
@pytest.mark.slow
def test_resumed_inpaint_run_equals_the_uninterrupted_one(runs):
    (want, want_heads), (got, got_heads) = weights(runs["inpaint", 2]), weights(runs["resumed"])
    for a, b in ((got, want), (got_heads, want_heads)):
        for key in b:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.multiproc
def test_bf16_inpaint_on_two_ranks(tmp_path, t2i_folder, task_teachers):
    run_dir = tmp_path / "bf16"
    sets = [*sets_for("inpaint", task_teachers["inpaint"], t2i_folder, 2), "deepspeed.precision=bf16"]
    train_tiny(run_dir, 2, sets, nproc=2)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["health/skipped_steps"] == 0 for r in records)
    assert all(
        torch.isfinite(torch.tensor([r["loss/generator"], r["loss/distill"], r["loss/discriminator"]])).all() for r in records
    )
    student, _ = weights(export(run_dir, tmp_path / "export", dtype="bf16"))
    assert student["pos_embed.proj.weight"].dtype == torch.bfloat16 and student["pos_embed.proj.weight"].shape[1] == 2 * C + 1


def test_validation_gives_every_network_the_condition(tmp_path, task_teachers, distributed_world_of_one):
    """eval.every on an inpainting run: the held-out set's condition columns reach the student's
    samples and the teacher's token pass (the FDs change with the condition), in fp32 and bf16."""
    import math

    from ladd_ds.data.schema import TASK_LAYOUTS
    from ladd_ds.data.writer import write_random_latents

    held_out = write_random_latents(
        tmp_path / "held_out", num_samples=4, latent_shape=(C, 16, 16), text_dim=32, pooled_dim=16, layout=TASK_LAYOUTS["inpaint"]
    )
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(
            tmp_path / precision, f"model.teacher={task_teachers['inpaint']}", "ladd.task=inpaint", f"eval.data={held_out}",
            "eval.num_samples=4", "eval.images=2", f"deepspeed.precision={precision}",
        )  # fmt: skip
        validation = trainer.validation
        metrics, grids = validation.run(trainer.method)
        assert sorted(grids) == ["val/1step/held_out", "val/2step/held_out", "val/4step/held_out"]
        for bucket in validation.buckets:
            bucket.batch["condition"] = torch.zeros_like(bucket.batch["condition"])
        validation.reference = None  # the stored samples' token features change with the condition too
        blind, _ = validation.run(trainer.method)
        for key in ("val/fd_tokens/1step", "val/fd_tokens/4step"):
            assert math.isfinite(metrics[key]) and math.isfinite(blind[key]) and metrics[key] != blind[key], (precision, key)
        trainer.close()
