"""RUN_DIR/train.log and warnings shown once (ladd_ds/training/logfile.py), without training:
the runs that write it are in tests/test_train_cli.py and tests/test_multirank.py."""

import re
import warnings

import pytest

from ladd_ds.training import logfile
from ladd_ds.training.logfile import RunLog, capture_warnings, log_line, logged_exceptions


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Nothing shown yet in this process, and Python's own registries out of the way: each
    warning reaches `showwarning`, as it does at every step of a training run."""
    monkeypatch.setattr(logfile, "_shown", set())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        capture_warnings()
        yield


def test_rank_0_log_has_a_header_per_start_its_lines_warnings_and_the_traceback(tmp_path, fresh_warnings, capsys):
    log = RunLog(tmp_path, rank=0, world_size=2, resume_step=None)
    log_line("step 1/4 | loss/generator 0.6931")
    warnings.warn("a library's warning", UserWarning)
    with pytest.raises(ZeroDivisionError), logged_exceptions():
        1 / 0
    log.close()
    log_line("after close: not in the file")
    RunLog(tmp_path, rank=0, world_size=1, resume_step=4).close()

    lines = (tmp_path / "train.log").read_text().splitlines()
    assert re.fullmatch(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d on \S+: .+ \| world size 2 \| starts at step 0", lines[0])
    assert lines[1] == "step 1/4 | loss/generator 0.6931"
    assert re.fullmatch(r"\S+ \S+ \[rank 0\] WARNING .*test_logfile\.py:\d+: UserWarning: a library's warning", lines[2])
    error = next(i for i, line in enumerate(lines) if "[rank 0] ERROR the run stopped with an exception" in line)
    assert lines[error + 1] == "Traceback (most recent call last):"
    assert lines[error + 2 :].count("ZeroDivisionError: division by zero") == 1
    assert lines[-1].endswith("| world size 1 | resumes from step 4")
    assert not any("after close" in line for line in lines)
    # The warning is still printed on stderr as Python prints it; the exception only propagated.
    err = capsys.readouterr().err
    assert "UserWarning: a library's warning" in err and "Traceback" not in err


def test_other_ranks_log_only_warnings_and_errors_with_their_rank(tmp_path, fresh_warnings):
    log = RunLog(tmp_path, rank=1, world_size=2, resume_step=None)
    log_line("rank 1's own progress")
    warnings.warn("rank 1 warns", UserWarning)
    with pytest.raises(Exception), logged_exceptions():
        from ladd_ds.core.errors import InputError

        raise InputError("data.path: no such folder")
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 3, lines  # no header, no info line: the warning (and its source line), the error
    assert "[rank 1] WARNING" in lines[0] and "rank 1 warns" in lines[0]
    assert lines[2].endswith("[rank 1] ERROR error: data.path: no such folder")  # a user's mistake: its one line


def test_deprecated_collective_warnings_are_shown_once_per_process(tmp_path, fresh_warnings, capsys):
    log = RunLog(tmp_path, rank=0, world_size=2, resume_step=None)
    for _ in range(3):  # what DeepSpeed's ZeRO collectives raise at every step on torch 2.14
        warnings.warn(
            "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
            "`torch.distributed.reduce_scatter_single` instead.",
            FutureWarning,
        )
        warnings.warn("another warning", UserWarning)  # not held back
    log.close()
    err = capsys.readouterr().err
    assert err.count("reduce_scatter_tensor") == 1 and err.count("UserWarning: another warning") == 3
    assert (tmp_path / "train.log").read_text().count("reduce_scatter_tensor") == 1
