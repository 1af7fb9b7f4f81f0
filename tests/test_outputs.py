"""A user's paths are theirs: every command that writes a folder or file refuses a target that holds
what it did not write (and leaves it exactly as it was), replaces only its own output of the same
kind and source, and another source's only with --overwrite (ladd_ds/core/outputs.py)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CONFIG, cli_error, export, run_cli

FAST = ["logging.progress_bar=false", "logging.tensorboard=false"]


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def user_folder(path: Path) -> Path:
    """A folder of the user's own, with a file in it."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work\n")
    return path


@pytest.fixture
def tiny_run(tiny_ladd_run) -> Path:
    """A finished LADD run (the session's, conftest.tiny_ladd_run; the tests leave it as it was)."""
    return tiny_ladd_run


def refused(capsys, folder: Path, *args: str) -> str:
    """`ladd-ds ARGS` exits 2 with one line, and `folder` is byte for byte what it was."""
    before = checksums(folder)
    err = cli_error(capsys, *args)
    assert checksums(folder) == before
    return err


def test_export_refuses_a_user_folder_a_file_and_the_run_itself(tiny_run, tmp_path, capsys, monkeypatch):
    precious = user_folder(tmp_path / "precious")
    err = refused(capsys, precious, "export", "--run", str(tiny_run), "--out", str(precious))
    assert "ladd-ds did not write (thesis.txt)" in err
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    assert "a file is there" in cli_error(capsys, "export", "--run", str(tiny_run), "--out", str(file))
    assert file.read_text() == "mine\n"
    err = refused(capsys, tiny_run, "export", "--run", str(tiny_run), "--out", str(tiny_run))
    assert "it holds a run directory" in err
    monkeypatch.chdir(precious)  # `--out .`: the current folder, which is the user's
    assert "ladd-ds did not write" in refused(capsys, precious, "export", "--run", str(tiny_run), "--out", ".")


def test_export_replaces_its_own_and_another_runs_only_with_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "student"
    export(tiny_run, out)
    export(tiny_run, out)  # the same run's export: replaced
    assert json.loads((out / ".ladd_ds_output").read_text())["kind"] == "export"
    other = tmp_path / "other_run"
    other.mkdir()
    for item in tiny_run.iterdir():  # the same checkpoint under another run directory
        if item.name != ".ladd_ds.lock":
            (other / item.name).symlink_to(item)
    err = refused(capsys, out, "export", "--run", str(other), "--out", str(out))
    assert "pass --overwrite" in err
    export(other, out, overwrite=True)
    assert json.loads((out / "ladd_export.json").read_text())["run_dir"] == str(other)


def test_convert_checkpoint_refuses_a_universal_folder_it_did_not_write(tiny_run, tmp_path, capsys):
    checkpoint = sorted((tiny_run / "checkpoints").glob("step-*"))[-1]  # the one convert-checkpoint converts
    universal = user_folder(checkpoint / "universal")
    try:
        err = refused(capsys, universal, "convert-checkpoint", "--run", str(tiny_run))
        assert "was not written by ladd-ds convert-checkpoint" in err
    finally:
        (universal / "thesis.txt").unlink()
        universal.rmdir()


def test_pretrain_teacher_and_demo_refuse_before_any_work(tmp_path, capsys):
    precious = user_folder(tmp_path / "precious")
    assert "ladd-ds did not write" in refused(capsys, precious, "pretrain-teacher", "--out", str(precious), "--steps", "1")
    assert "ladd-ds did not write" in refused(capsys, precious, "demo", "--out", str(precious), "--size", "test")


def test_pretrain_teacher_replaces_only_a_teacher_of_the_same_settings(tmp_path, capsys):
    from ladd_ds.demo.pretrain import PretrainSettings, pretrain_teacher

    out = tmp_path / "teacher"
    settings = PretrainSettings(steps=1, batch_size=2)
    pretrain_teacher(out, settings)
    pretrain_teacher(out, settings)  # same settings: replaced
    from ladd_ds.core.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        pretrain_teacher(out, PretrainSettings(steps=1, batch_size=2, seed=1))
    pretrain_teacher(out, PretrainSettings(steps=1, batch_size=2, seed=1), overwrite=True)


def test_synth_encode_and_pairs_refuse_a_user_folder(tmp_path, capsys):
    precious = user_folder(tmp_path / "precious")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 3\n")
    config = ["--config", str(TINY_CONFIG)]
    assert "ladd-ds did not write" in refused(
        capsys, precious, "synth", *config, "--prompts", str(prompts), "--out", str(precious)
    )
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "a.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a.png\ta black square\n")
    args = ["encode", *config, "--images", str(images), "--captions", str(captions), "--out", str(precious)]
    assert "ladd-ds did not write" in refused(capsys, precious, *args)
    sets = ["--set", f"pairs.prompts={prompts}", "--set", "pairs.scorer=tests.test_dpo:brightness_scorer"]
    assert "ladd-ds did not write" in refused(capsys, precious, "pairs", *config, *sets, "--out", str(precious))


def test_a_dataset_is_not_written_into_an_export(tiny_run, tmp_path, capsys):
    exported = export(tiny_run, tmp_path / "student")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 3\n")
    err = refused(capsys, exported, "synth", "--config", str(TINY_CONFIG), "--prompts", str(prompts), "--out", str(exported))
    assert "it holds an export" in err


def test_sample_refuses_files_it_did_not_write_and_another_models_samples(small_demo_teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 3\n")
    base = ["sample", "--prompts", str(prompts), "--steps", "1", "--per-prompt", "1", "--size", "16x16"]
    user = tmp_path / "grid.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(user)
    err = refused(capsys, tmp_path, *base, "--model", str(small_demo_teacher), "--out", str(tmp_path / "grid"))
    assert "was not written by ladd-ds sample" in err
    out = tmp_path / "samples" / "grid"
    run_cli(*base, "--model", str(small_demo_teacher), "--out", str(out), launcher="in-process")
    run_cli(*base, "--model", str(small_demo_teacher), "--out", str(out), "--seed", "1", launcher="in-process")  # same model
    other = tmp_path / "other_teacher"
    other.symlink_to(small_demo_teacher)
    err = refused(capsys, out.parent, *base, "--model", str(other), "--out", str(out))
    assert "pass --overwrite" in err
    run_cli(*base, "--model", str(other), "--out", str(out), "--overwrite", launcher="in-process")
    assert str(np.load(out.with_suffix(".npz"))["ladd_ds_samples"]) == str(other)


def test_train_refuses_a_user_folder_and_an_export_as_run_directory(tiny_run, tmp_path, capsys):
    precious = user_folder(tmp_path / "precious")
    args = ["train", "--config", str(TINY_CONFIG), "--max-steps", "1"]
    assert "not a ladd-ds run" in refused(capsys, precious, *args, "--run-dir", str(precious))
    exported = export(tiny_run, tmp_path / "student")
    assert "it holds an export" in refused(capsys, exported, *args, "--run-dir", str(exported))
