"""`ladd-ds convert-checkpoint`: the world-size conversion as its own resumable step, outside any
collective (ladd_ds/training/convert.py). Loading the converted checkpoint on another world size
is tested in tests/test_resume_world_size.py."""

import json
import socket

import pytest

from ladd_ds.training import convert
from tests.conftest import cli_error, copy_run_until, hold, run_cli

pytestmark = [pytest.mark.multiproc]  # the 2-rank reference run


@pytest.fixture
def run_dir(reference_runs, tmp_path):
    return copy_run_until(reference_runs(2), tmp_path / "run", 3)


def checkpoint_of(run_dir):
    return run_dir / "checkpoints" / "step-00000003"


def test_an_interrupted_conversion_resumes_and_a_second_one_does_nothing(run_dir, monkeypatch, capsys):
    checkpoint = checkpoint_of(run_dir)
    engines = convert.trainable_engines(checkpoint)
    assert engines == ["heads", "student"]
    real = convert._run_ds_to_universal
    converted = []

    def die_on_the_second(source, staging, name):
        if converted:
            raise KeyboardInterrupt  # as when the job is stopped
        real(source, staging, name)
        converted.append(name)

    monkeypatch.setattr(convert, "_run_ds_to_universal", die_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_run(run_dir)
    assert not convert.is_converted(checkpoint) and (checkpoint / convert.STAGING / "heads").is_dir()
    assert not (checkpoint / convert.LOCK).exists() and (checkpoint / convert.FAILED).is_file()

    monkeypatch.setattr(convert, "_run_ds_to_universal", real)
    out = run_cli("convert-checkpoint", "--run", str(run_dir), launcher="in-process").stdout
    assert "heads: already converted" in out and "student: done" in out and "s per GiB" in out
    record = json.loads((checkpoint / "universal" / convert.RECORD).read_text())
    assert set(record["engines"]) == {"student"} and record["bytes"] > 0  # this attempt's work
    assert sorted(p.name for p in (checkpoint / "universal").iterdir() if p.is_dir()) == engines
    assert not (checkpoint / convert.STAGING).exists() and not (checkpoint / convert.FAILED).exists()
    assert "nothing to do" in run_cli("convert-checkpoint", "--run", str(run_dir), launcher="in-process").stdout


def test_a_live_lock_is_respected_and_a_dead_one_taken_over(run_dir, capsys):
    checkpoint = checkpoint_of(run_dir)
    hold(checkpoint / convert.LOCK, 1)  # a live process of this host (pid 1 outlives the test)
    err = cli_error(capsys, "convert-checkpoint", "--run", str(run_dir))
    assert f"the conversion of {checkpoint} is in use by another ladd-ds process: pid 1 on host {socket.gethostname()}" in err
    with pytest.raises(RuntimeError, match="is gone"):  # a waiting rank notices when its converter dies
        hold(checkpoint / convert.LOCK, 2**22 + 1, start_ticks=None)
        convert.wait_for_conversion(checkpoint, poll_s=0.01)
    (checkpoint / convert.LOCK).unlink()
    (checkpoint / convert.FAILED).write_text("RuntimeError: disk full\n")
    with pytest.raises(RuntimeError, match="disk full"):
        convert.wait_for_conversion(checkpoint, poll_s=0.01)
    hold(checkpoint / convert.LOCK, 2**22 + 1, start_ticks=None)  # died while converting
    convert.convert_run(run_dir)
    assert convert.is_converted(checkpoint) and not (checkpoint / convert.LOCK).exists()
