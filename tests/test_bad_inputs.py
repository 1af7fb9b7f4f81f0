"""Every bad input a user can give ends in exit status 2 and one line `ladd-ds CMD: error: ...`
that names the file, key or argument and says what to do, and changes no file that was there
before (checksums of the work, run and data folders before and after).

ROWS is the table: add a row per new bad input. A row's argv may use {work} (a fresh folder per
row, holding the row's files), {run} (a finished 2-step LADD run shared by the rows: never
changed, which the checksums verify), {pairs} (preference pairs), {config} and {dpo_config} (the
tiny configs). The full-disk test at the end injects ENOSPC into a checkpoint save."""

from __future__ import annotations

import errno
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, copy_run_until, hold, read_metrics, run_cli
from tests.test_dpo import DPO_CONFIG, write_random_pairs


@dataclass(frozen=True)
class Row:
    name: str
    argv: list[str]  # ladd-ds arguments, formatted with the placeholders above
    names: str  # the file, key or argument the error line must name (formatted too)
    todo: str  # what the line says to do (a substring)
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under {work} first
    setup: Callable[[Path, Path], None] | None = None  # setup(work, run) after the files


def train(*args: str) -> list[str]:
    return ["train", "--config", "{config}", "--run-dir", "{work}/run", *args]


def dry_run(*args: str) -> list[str]:
    return ["train", "--config", "{config}", "--dry-run", *args]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def sample(*args: str) -> list[str]:
    return ["sample", "--model", "{run}", "--out", "{work}/samples", *args]


PROMPTS = {"p.txt": "a red seven in the top left\n"}
ENCODE = [
    "encode",
    "--config",
    "{config}",
    "--images",
    "{work}/images",
    "--captions",
    "{work}/captions.txt",
    "--out",
    "{work}/enc",
]


def latents_copy(work: Path, run: Path) -> None:
    """{work}/data: a copy of the run's random-latent MDS dataset."""
    shutil.copytree(run / "data" / "random_latents", work / "data")


def without_index(work: Path, run: Path) -> None:
    latents_copy(work, run)
    (work / "data" / "index.json").unlink()


def truncated_shard(work: Path, run: Path) -> None:
    latents_copy(work, run)
    shard = next((work / "data").glob("shard.*.mds"))
    shard.write_bytes(shard.read_bytes()[:-10])


MINE = {"mine/thesis.txt": "four years of work\n"}


def png_bytes() -> bytes:
    """A small valid PNG image."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


NOTES = {"notes.txt": "my notes\n"}


def EXPORT(out: str) -> list[str]:
    return ["export", "--run", "{run}", "--out", out]


def resume(*args: str) -> list[str]:
    """The shared run resumed (it stopped at step 2) with `args`."""
    return ["train", "--config", "{config}", "--run-dir", "{run}", "--max-steps", "3", *args]


def foreign_export(work: Path, run: Path) -> None:
    """{work}/student: an export of another run."""
    from ladd_ds.core.outputs import write_marker

    (work / "student").mkdir()
    (work / "student" / "ladd_export.json").write_text("{}")
    write_marker(work / "student", "export", source="/elsewhere/runs/other")


def held_run(work: Path, run: Path) -> None:
    """{work}/run locked by a live process of this host (pid 1, which outlives every test)."""
    from ladd_ds.core.lock import LOCK_FILE

    (work / "run").mkdir()
    hold(work / "run" / LOCK_FILE, 1)


def run_with_foreign_universal(work: Path, run: Path) -> None:
    """{work}/run: a copy of the shared run whose newest checkpoint holds a universal/ folder of the user's."""
    copy_run_until(run, work / "run", 2)
    universal = work / "run" / "checkpoints" / "step-00000002" / "universal"
    universal.mkdir()
    (universal / "notes.txt").write_text("mine\n")


ROWS = [
    # --- issue 32, item 6 and item 8
    Row("run dir is a file", train(), "{work}/run", "pass another --run-dir", {"run": "not a folder"}),
    Row(
        "sample --per-prompt 0",
        sample("--prompts", "{work}/p.txt", "--per-prompt", "0"),
        "--per-prompt 0",
        "must be >= 1",
        PROMPTS,
    ),
    Row(
        "prompt file not UTF-8",
        sample("--prompts", "{work}/latin1.txt"),
        "{work}/latin1.txt:2",
        "save the file as UTF-8",
        {"latin1.txt": b"a red seven\na caf\xe9 in the top left\n"},
    ),
    Row("negative lr, dry run", dry_run(*sets("optim.student_lr=-1")), "--set optim.student_lr=-1", "must be >= 0"),
    Row("negative lr", train(*sets("optim.student_lr=-1")), "--set optim.student_lr=-1", "must be >= 0"),
    Row("negative DPO lr", ["dpo", "--config", "{dpo_config}", *sets("dpo.lr=-1")], "--set dpo.lr=-1", "must be > 0"),
    Row("--world-size without --dry-run", train("--world-size", "8"), "--world-size", "add --dry-run"),
    Row("--set error names the --set", train(*sets("optim.grad_accum=0")), "--set optim.grad_accum=0: optim.grad_accum", ">= 1"),
    Row("a flag's error names the flag", dry_run("--max-steps", "-1"), "--max-steps -1: run.max_steps", ">= 0"),
    Row(
        "missing data",
        train(*sets("data.source=mds", "data.path={work}/nowhere")),
        "{work}/nowhere",
        "ladd-ds synth / ladd-ds encode",
    ),
    Row(
        "dry run of missing data",
        dry_run(*sets("data.source=mds", "data.path={work}/nowhere")),
        "--dry-run: the run could not start: data: ",
        "ladd-ds synth / ladd-ds encode",
    ),
    Row(
        "dpo into a LADD run",
        ["dpo", "--config", "{dpo_config}", "--run-dir", "{run}", *sets("data.path={pairs}")],
        "{run}",
        "pass another --run-dir",
    ),
    # --- configs
    Row(
        "malformed YAML",
        ["train", "--config", "{work}/bad.yaml"],
        "{work}/bad.yaml",
        "fix it there",
        {"bad.yaml": "run: {seed: 1\n"},
    ),
    Row(
        "config not UTF-8",
        ["train", "--config", "{work}/latin1.yaml"],
        "{work}/latin1.yaml",
        "save it as UTF-8",
        {"latin1.yaml": b"run:\n  run_dir: caf\xe9\n"},
    ),
    Row("missing config", ["train", "--config", "{work}/nope.yaml"], "{work}/nope.yaml", "pass --config FILE"),
    Row(
        "unknown key in the file",
        ["train", "--config", "{work}/c.yaml", "--dry-run"],
        "{work}/c.yaml: optim.student_rl",
        "unknown key (known: ",
        {"c.yaml": "optim:\n  student_rl: 1.0e-5\n"},
    ),
    Row("unknown key by --set", dry_run(*sets("ladd.renoise_z=1")), "--set ladd.renoise_z=1", "unknown key (known: "),
    Row("wrong type", dry_run(*sets("optim.student_lr=fast")), "optim.student_lr", "expected a number"),
    Row("bad Literal", dry_run(*sets("deepspeed.precision=fp8")), "deepspeed.precision", "is not one of ['fp32', 'bf16']"),
    Row("--set without '='", dry_run(*sets("optim")), "--set optim", "expected section.key=value"),
    Row("--set into a value", dry_run(*sets("run.seed.x=1")), "--set run.seed.x=1", "set run.seed=VALUE itself"),
    Row("--set value not YAML", dry_run(*sets("optim.betas=[0.9")), "--set optim.betas=[0.9", "not valid YAML"),
    Row("betas out of range", dry_run(*sets("optim.betas=[0.9, 1.0]")), "optim.betas", "each in [0, 1)"),
    Row("micro batch 0", dry_run(*sets("data.micro_batch_size=0")), "data.micro_batch_size", ">= 1"),
    Row("keep no checkpoint", dry_run(*sets("checkpoint.keep_last=0")), "checkpoint.keep_last", ">= 1"),
    Row("--device-memory-gib 0", dry_run("--device-memory-gib", "0"), "--device-memory-gib 0", "must be > 0"),
    Row(
        "DPO with EMA",
        ["dpo", "--config", "{dpo_config}", *sets("data.path={pairs}", "optim.ema_decay=0.5")],
        "optim.ema_decay",
        "set it to 0",
    ),
    # --- CLI arguments
    Row("sample --steps 0", sample("--prompts", "{work}/p.txt", "--steps", "0"), "--steps 0", "must be >= 1", PROMPTS),
    Row(
        "sample --size malformed",
        sample("--prompts", "{work}/p.txt", "--size", "128by128"),
        "--size 128by128",
        "e.g. 128x128",
        PROMPTS,
    ),
    Row("missing prompt file", sample("--prompts", "{work}/none.txt"), "{work}/none.txt", "pass a file of prompts"),
    Row(
        "empty prompt file",
        sample("--prompts", "{work}/empty.txt"),
        "{work}/empty.txt",
        "write at least one",
        {"empty.txt": "\n\n"},
    ),
    Row(
        "JSONL prompt file with a bad line",
        sample("--prompts", "{work}/p.jsonl"),
        "{work}/p.jsonl:3",
        "fix or remove the line",
        {"p.jsonl": '{"prompt": "a red seven"}\n\n{"prompt": "a blue two"\n'},
    ),
    Row(
        "synth: JSONL prompt file with a bad line",
        ["synth", "--config", "{config}", "--prompts", "{work}/p.jsonl", "--out", "{work}/synth"],
        "{work}/p.jsonl:2",
        "fix or remove the line",
        {"p.jsonl": '{"prompt": "a red seven"}\n{"text": "a blue two"}\n'},
    ),
    Row(
        "synth without prompts",
        ["synth", "--config", "{config}", "--out", "{work}/synth"],
        "--prompts FILE",
        "or set synth.prompts",
    ),
    Row(
        "export --lora folder missing",
        ["export", "--run", "{run}", "--lora", "{work}/nolora", "--out", "{work}/export"],
        "{work}/nolora",
        "write one with `ladd-ds export` of a DPO run",
    ),
    Row(
        "export of a missing run",
        ["export", "--run", "{work}/norun", "--out", "{work}/export"],
        "--run {work}/norun",
        "pass the run directory of a `ladd-ds train` or `ladd-ds dpo` run",
    ),
    Row(
        "export --step that does not exist",
        ["export", "--run", "{run}", "--step", "99", "--out", "{work}/export"],
        "--step 99",
        "pass one of [1, 2]",
    ),
    Row(
        "export --shard-size malformed",
        ["export", "--run", "{run}", "--shard-size", "lots", "--out", "{work}/export"],
        "--shard-size",
        "write e.g. 5GB",
    ),
    Row(
        "export --merge of a LADD run",
        ["export", "--run", "{run}", "--merge", "--out", "{work}/export"],
        "--merge",
        "use --lora DIR",
    ),
    Row(
        "convert-checkpoint of a folder that is not a run",
        ["convert-checkpoint", "--run", "{work}/plain"],
        "--run {work}/plain",
        "train first",
        {"plain/notes.txt": "my notes\n"},
    ),
    Row(
        "convert-checkpoint --step that does not exist",
        ["convert-checkpoint", "--run", "{run}", "--step", "7"],
        "--step 7",
        "pass one of [1, 2]",
    ),
    Row(
        "pairs --import-pairs without --images",
        ["pairs", "--config", "{dpo_config}", "--import-pairs", "{work}/prefs.jsonl", "--out", "{work}/pairs"],
        "--import-pairs needs --images DIR",
        "the folder of the winner/loser images",
    ),
    # --- images and caption files
    Row(
        "an image folder that is not there",
        ["encode", "--config", "{config}", "--images", "{work}/nope", "--captions", "{work}/captions.txt", "--out", "{work}/enc"],
        "image folder {work}/nope",
        "does not exist",
        {"captions.txt": "a.png\ta caption\n"},
    ),
    Row(
        "caption line without a tab",
        ENCODE,
        "{work}/captions.txt:1",
        "expected 'file<TAB>caption'",
        {"images/notes.txt": "my notes\n", "captions.txt": "notes.txt a caption\n"},
    ),
    Row(
        "caption file not UTF-8",
        ENCODE,
        "{work}/captions.txt:1",
        "save the file as UTF-8",
        {"images/notes.txt": "my notes\n", "captions.txt": b"a.png\tun caf\xe9\n"},
    ),
    # --- shards
    Row(
        "data.path that is not an MDS folder",
        train(*sets("data.source=mds", "data.path={work}/photos")),
        "{work}/photos",
        "point data.path at the output of ladd-ds synth / ladd-ds encode",
        {"photos/cat.jpg": b"\xff\xd8\xff not really a jpeg"},
    ),
    Row(
        "index.json deleted",
        train(*sets("data.source=mds", "data.path={work}/data")),
        "{work}/data",
        "write it again",
        setup=without_index,
    ),
    Row(
        "truncated shard",
        train(*sets("data.source=mds", "data.path={work}/data")),
        "{work}/data/shard.00000.mds",
        "Copy or regenerate the dataset",
        setup=truncated_shard,
    ),
    Row(
        "latents given to dpo",
        ["dpo", "--config", "{dpo_config}", "--run-dir", "{work}/run", *sets("data.path={work}/data")],
        "{work}/data",
        "Write it with ladd-ds pairs",
        setup=latents_copy,
    ),
    Row(
        "fewer pairs than one batch",
        ["dpo", "--config", "{dpo_config}", "--run-dir", "{work}/run", *sets("data.path={pairs}", "data.micro_batch_size=64")],
        "data.path {pairs}",
        "lower data.micro_batch_size",
    ),
    # --- outputs that are not the command's own (ladd_ds/core/outputs.py), places in use, resumes
    Row("export onto a user's folder", EXPORT("{work}/mine"), "--out {work}/mine", "Pass a new or empty folder", MINE),
    Row("export onto a file", EXPORT("{work}/notes.txt"), "--out {work}/notes.txt", "never replaces a file", NOTES),
    Row("export --out RUN_DIR", EXPORT("{run}"), "--out {run}: it holds a run directory", "Pass another --out"),
    Row(
        "export onto another run's export",
        EXPORT("{work}/student"),
        "--out {work}/student",
        "pass --overwrite",
        setup=foreign_export,
    ),
    Row(
        "sample onto a user's PNG",
        ["sample", "--model", "{run}", "--prompts", "{work}/p.txt", "--out", "{work}/grid"],
        "{work}/grid.png",
        "pass another --out",
        {**PROMPTS, "grid.png": b"\x89PNG my drawing"},
    ),
    Row("train into a user's folder", train(), "--run-dir {work}/run", "pass a new or empty folder", {"run/thesis.txt": "mine"}),
    Row("a run directory in use", train(), "run directory {work}/run is in use", "Wait for it to finish", setup=held_run),
    Row("resume with another lr", resume(*sets("optim.student_lr=0.5")), "optim.student_lr: 0.0001 -> 0.5", "--allow-change"),
    Row(
        "resume with wider heads",
        resume(*sets("discriminator.hidden_channels=64")),
        "hidden_channels: 32 -> 64",
        "--allow-change",
    ),
    Row(
        "convert-checkpoint over a user's universal/",
        ["convert-checkpoint", "--run", "{work}/run"],
        "universal was not written by ladd-ds convert-checkpoint",
        "move it out of the checkpoint",
        setup=run_with_foreign_universal,
    ),
    Row(
        "pretrain-teacher onto a user's folder",
        ["pretrain-teacher", "--out", "{work}/mine", "--steps", "1"],
        "{work}/mine",
        "Pass a new",
        MINE,
    ),
    Row("demo onto a user's folder", ["demo", "--out", "{work}/mine", "--size", "test"], "--out {work}/mine", "Pass a new", MINE),
    Row(
        "synth into a user's folder",
        ["synth", "--config", "{config}", "--prompts", "{work}/p.txt", "--out", "{work}/mine"],
        "--out {work}/mine",
        "Pass a new or empty folder",
        {**PROMPTS, **MINE},
    ),
    Row(
        "encode into a run directory",
        ["encode", "--config", "{config}", "--images", "{work}", "--captions", "{work}/c.txt", "--out", "{run}"],
        "--out {run}: it holds a run directory",
        "Pass another --out",
        {"c.txt": "a.png\ta caption\n", "a.png": png_bytes()},
    ),
]


def checksums(*folders: Path) -> dict[str, str]:
    files = [f for folder in folders if folder.exists() for f in sorted(folder.rglob("*")) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def shared(tiny_ladd_run, tmp_path_factory) -> dict[str, Path]:
    pairs = write_random_pairs(tmp_path_factory.mktemp("bad_inputs_pairs") / "pairs")
    return {"run": tiny_ladd_run, "pairs": Path(pairs)}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_bad_input_is_one_line_and_changes_nothing(row: Row, shared, tmp_path, capsys):
    from ladd_ds.cli import main

    work = tmp_path / "work"
    work.mkdir()
    for name, content in row.files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(content.encode() if isinstance(content, str) else content)
    if row.setup is not None:
        row.setup(work, shared["run"])
    values = {"work": work, "config": TINY_CONFIG, "dpo_config": DPO_CONFIG, **shared}
    argv = [a.format(**values) for a in row.argv]
    before = checksums(work, shared["run"], shared["pairs"])
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("ladd-ds ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"ladd-ds {argv[0]}: error: "), line
    assert row.names.format(**values) in line, line
    assert row.todo in line, line
    assert checksums(work, shared["run"], shared["pairs"]) == before


# --------------------------------------------------------------------- a full disk


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # What torch.save's C++ writer raises on a full disk: no errno, so the free space decides.
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 basic_ios::clear: iostream error"),
    ],
    ids=["ENOSPC", "torch writer"],
)
def test_a_full_disk_names_the_checkpoint_and_the_run_resumes(failure, tiny_ladd_run, tmp_path, monkeypatch, capsys):
    """A checkpoint save that runs out of space: exit 2 and one line naming the checkpoint and
    "no space left"; its partial files are removed, the previous checkpoint is kept, and the same
    command resumes from it once there is space."""
    import torch

    from ladd_ds.core import errors

    run_dir = copy_run_until(tiny_ladd_run, tmp_path / "run", 2)
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), "--max-steps", "3"]
    args += sets("logging.progress_bar=false", "checkpoint.every=1")
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise failure

    monkeypatch.setattr(torch, "save", full)
    if isinstance(failure, RuntimeError):
        monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    proc = run_cli(*args, launcher="in-process", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    target = run_dir / "checkpoints" / "step-00000003"
    assert line == (
        f"ladd-ds train: error: checkpoint {target}: no space left on device; free space and run the same command to resume"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]  # no temp dir

    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.undo()
    resumed = run_cli(*args, launcher="in-process")
    assert "at step 2" in resumed.stdout and "done: step 3" in resumed.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, monkeypatch):
    from ladd_ds.core.errors import NoSpaceError
    from ladd_ds.training.metrics import MetricLogger

    logger = MetricLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 1.0})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(NoSpaceError, match=rf"metrics {tmp_path / 'metrics.jsonl'}: no space left on device"):
        logger.log(2, {"loss": 0.5})
