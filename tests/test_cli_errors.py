"""`ladd-ds` turns the project's user-facing errors into one line and exit status 2, and lets
every other exception (a bug) raise with its traceback."""

import pytest

from ladd_ds import sampling
from ladd_ds.cli import main


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "prompts.txt"
    assert main(["sample", "--model", str(tmp_path), "--prompts", str(missing), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ladd-ds sample: error: prompt file {missing} does not exist; pass a file of")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal invariant")  # a plain ValueError is not a user error

    monkeypatch.setattr(sampling, "run_sample", broken)
    (tmp_path / "p.txt").write_text("a prompt\n")
    with pytest.raises(ValueError, match="an internal invariant"):
        main(["sample", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x")])
