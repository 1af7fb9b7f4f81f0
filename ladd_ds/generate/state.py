"""What a `synth` / `encode` output remembers about how it was made, so that a re-run continues it
only with the same inputs.

- OUT/generation.state: the settings that shape every sample (teacher identity, guidance, steps,
  seeds, buckets, text and codec settings), written at the first start and compared at every
  later one. A re-run with other settings stops and names what changed.
- Every committed part lists its samples as [key, digest]: the sample's stable key (the prompt's
  position for synth, the image's relative path for encode) and a digest of the inputs it was
  made from (prompt or caption, bucket, seed). A re-run whose prompt for an existing key changed
  stops and names it; new keys (prompts or images appended) are generated.
- OUT/skipped/*.skipped: samples that could not be made (an image that does not decode, is
  missing or too small), each with its reason and skip_digest: the inputs' digest and, for
  `encode`, the files' size and mtime. They count as done while that digest holds, so a re-run
  does not retry them; a changed file makes the skip stale: rank 0 drops it from its record at
  the start of the next run (drop_stale_skips), which then retries the sample. The manifest lists
  the skips that hold.

None of these files is named *.json: streaming's index merging reads every .json under a bucket
as an index (streaming 0.13).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ladd_ds.core.errors import InputError
from ladd_ds.data.prompts import input_digest
from ladd_ds.data.schema import GENERATION_STATE_FILE as STATE_FILE

PART_FILE = "part.samples"
PART_STATS = "part.stats"  # numbers a command sums over parts (generate_dataset's part_stats)
SKIPPED_DIR = "skipped"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def check_or_write_state(out: Path, command: str, settings: dict) -> None:
    """Write OUT/generation.state at the first start; afterwards, stop when `settings` differ from
    the recorded ones (rank 0 calls this before anything is generated)."""
    path = out / STATE_FILE
    if not path.is_file():
        if any(out.glob(f"*/part-*/{PART_FILE}")) or any(out.glob("*/part-*/part.indices")):
            raise InputError(
                f"{out} holds parts but no {STATE_FILE}: it was started by an earlier version of ladd-ds that did not "
                f"record its settings, so a continuation could mix settings. Finish it with that version, or pass a new --out"
            )
        write_text_atomic(path, json.dumps({"command": command, "settings": settings}, indent=1, sort_keys=True))
        return
    recorded = json.loads(path.read_text())
    if recorded.get("command") != command:
        raise InputError(f"{out} was written by `ladd-ds {recorded.get('command')}`, not `ladd-ds {command}`: pass another --out")
    old = recorded["settings"]
    changed = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
    if changed:
        lines = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise InputError(
            f"{out} was started with other settings ({path}): {lines}. Continuing would mix samples made two ways: "
            "restore those settings to continue it, or pass a new --out to start another dataset"
        )


@dataclass(frozen=True)
class Done:
    digest: str  # of the inputs the sample was made (or skipped) from
    where: Path  # the part or skip record holding it
    skipped: bool


def skip_digest(job) -> str:
    """What a skip record holds of the job it skipped: its inputs' digest and, where the job has
    one, the stamp of its files (size and mtime, as make and rsync compare them: no file is read).
    A skip whose digest differs from its job's is stale: the file changed, retry it."""
    return input_digest(job.digest, job.stamp) if job.stamp else job.digest


def _written(out: Path) -> dict[str, Done]:
    """Key -> the committed part holding it; a key in two parts is an error (parts are renamed
    into place when complete and never made twice)."""
    written: dict[str, Done] = {}
    for part_file in sorted(out.glob(f"*/part-*/{PART_FILE}")):
        for key, value_digest in json.loads(part_file.read_text()):
            if key in written:
                raise InputError(
                    f"{out}: sample {key!r} is in both {written[key].where} and {part_file.parent}; remove one of these parts"
                )
            written[key] = Done(value_digest, part_file.parent, skipped=False)
    return written


def completed_samples(out: Path) -> dict[str, Done]:
    """Sample key -> where it is done, over every committed part and skip record (parts are
    renamed into place when complete, records replaced atomically). A written sample supersedes
    a skip record of its key: a retry made it (drop_stale_skips removes such entries)."""
    done = _written(out)
    for record in sorted((out / SKIPPED_DIR).glob("*.skipped")):
        for item in json.loads(record.read_text()):
            done.setdefault(item["key"], Done(item["digest"], record, skipped=True))
    return done


def _skip_holds(current: str | None, recorded: str) -> bool:
    """Whether a skip recorded with digest `recorded` holds for a job of skip digest `current`
    (None: no such job; "": not known on this rank, as `pairs` reads only its own rank's files,
    so the record is trusted: every rank must agree on what is done)."""
    return current == "" or current == recorded


def still_done(done: dict[str, Done], jobs: list) -> set[str]:
    """Keys that need no work: written samples, and skips of unchanged inputs and files (a
    replaced image is tried again)."""
    digests = {j.key: skip_digest(j) for j in jobs}
    return {k for k, d in done.items() if not d.skipped or _skip_holds(digests.get(k), d.digest)}


def drop_stale_skips(out: Path, jobs: list) -> int:
    """Remove from the skip records the entries a re-run supersedes: keys written in a part (a
    retry made them) and skips of current jobs whose inputs or files changed (they are retried
    now). Each record is replaced atomically (deleted when emptied), so a kill in here leaves
    records that are still right. Rank 0, before any rank writes. Returns the entries dropped.

    A job whose digest is unknown on this rank ("": `pairs` reads only its own rank's files)
    keeps its skip, as do the skips of lines removed from the input (they hold if put back)."""
    written = _written(out)
    current = {j.key: skip_digest(j) for j in jobs}
    dropped = 0
    for record in sorted((out / SKIPPED_DIR).glob("*.skipped")):
        items = json.loads(record.read_text())
        keep = [i for i in items if i["key"] not in written and _skip_holds(current.get(i["key"], ""), i["digest"])]
        if len(keep) == len(items):
            continue
        dropped += len(items) - len(keep)
        if keep:
            write_text_atomic(record, json.dumps(keep))
        else:
            record.unlink()
    return dropped


def check_unchanged(out: Path, done: dict[str, Done], jobs: list, what: str) -> None:
    """Stop when a written sample's inputs (its job's digest) changed since it was made. A job
    whose digest is unknown ("": its file is missing, or another rank reads it) is not compared."""
    changed = [j for j in jobs if j.digest and j.key in done and not done[j.key].skipped and done[j.key].digest != j.digest]
    if changed:
        first = changed[0]
        raise InputError(
            f"{len(changed)} {what} changed since their samples were written to {out} (first: {first.key!r}, "
            f"now {first.prompt!r}): restore them to continue this output, or pass a new --out"
        )


def record_skipped(out: Path, *, rank: int, serial: int, skipped: list[tuple]) -> None:
    """Commit this rank's skipped samples [(job, reason)] as one record (atomic)."""
    folder = out / SKIPPED_DIR
    folder.mkdir(exist_ok=True)
    items = [{"key": job.key, "digest": skip_digest(job), "file": job.image, "reason": reason} for job, reason in skipped]
    name = f"rank-{rank:05d}-{serial:06d}-{input_digest([i['key'] for i in items])}.skipped"
    write_text_atomic(folder / name, json.dumps(items))


def skipped_samples(out: Path, jobs: list) -> list[dict]:
    """The skips that hold for the current jobs (an image whose line was removed is no longer
    listed, nor one written since)."""
    digests = {j.key: skip_digest(j) for j in jobs}
    written = _written(out)
    items = []
    for record in sorted((out / SKIPPED_DIR).glob("*.skipped")):
        for i in json.loads(record.read_text()):
            if _skip_holds(digests.get(i["key"]), i["digest"]) and i["key"] not in written:
                items.append({"key": i["key"], "file": i["file"], "reason": i["reason"]})
    return sorted(items, key=lambda i: i["key"])


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the hidden temporary parts (`.part-*.tmp*`) and records (`.*.tmp-*`) a killed run
    left behind. Called by rank 0 at the start of a run, before any rank writes: no live writer
    of this output can own them."""
    stale = list(out.glob("*/.part-*.tmp*")) + list(out.glob(".*.tmp-*")) + list(out.glob(f"{SKIPPED_DIR}/.*.tmp-*"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale
