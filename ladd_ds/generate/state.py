"""What a `synth` / `encode` output remembers about how it was made, so that a re-run continues it
only with the same inputs.

- OUT/generation.state: the settings that shape every sample (teacher identity, guidance, steps,
  seeds, buckets, text and codec settings), written at the first start and compared at every
  later one. A re-run with other settings stops and names what changed.
- Every committed part lists its samples as [key, digest]: the sample's stable key (the prompt's
  position for synth, the image's relative path for encode) and a digest of the inputs it was
  made from (prompt or caption, bucket, seed). A re-run whose prompt for an existing key changed
  stops and names it; new keys (prompts or images appended) are generated.
- OUT/skipped/*.skipped: samples that could not be made (an image that does not decode), each
  with its reason; they count as done, so a re-run does not retry them, and the manifest lists
  them.

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


def completed_samples(out: Path) -> dict[str, Done]:
    """Sample key -> where it is done, over every committed part and skip record (parts are
    renamed into place when complete, records replaced atomically)."""
    done: dict[str, Done] = {}

    def add(key: str, item: Done) -> None:
        if key in done:
            raise InputError(f"{out}: sample {key!r} is in both {done[key].where} and {item.where}; remove one of them")
        done[key] = item

    for part_file in sorted(out.glob(f"*/part-*/{PART_FILE}")):
        for key, value_digest in json.loads(part_file.read_text()):
            add(key, Done(value_digest, part_file.parent, skipped=False))
    for record in sorted((out / SKIPPED_DIR).glob("*.skipped")):
        for item in json.loads(record.read_text()):
            add(item["key"], Done(item["digest"], record, skipped=True))
    return done


def still_done(done: dict[str, Done], jobs: list) -> set[str]:
    """Keys that need no work: written samples, and skips whose inputs are unchanged (a replaced
    image is tried again)."""
    digests = {j.key: j.digest for j in jobs}
    return {k for k, d in done.items() if not d.skipped or digests.get(k) == d.digest}


def check_unchanged(out: Path, done: dict[str, Done], jobs: list, what: str) -> None:
    """Stop when a written sample's inputs (its job's digest) changed since it was made."""
    changed = [j for j in jobs if j.key in done and not done[j.key].skipped and done[j.key].digest != j.digest]
    if changed:
        first = changed[0]
        raise InputError(
            f"{len(changed)} {what} changed since their samples were written to {out} (first: {first.key!r}, "
            f"now {first.prompt!r}): restore them to continue this output, or pass a new --out"
        )


def record_skipped(out: Path, rank: int, serial: int, skipped: list[tuple]) -> None:
    """Commit this rank's skipped samples [(job, reason)] as one record (atomic)."""
    folder = out / SKIPPED_DIR
    folder.mkdir(exist_ok=True)
    items = [{"key": job.key, "digest": job.digest, "file": job.image, "reason": reason} for job, reason in skipped]
    name = f"rank-{rank:05d}-{serial:06d}-{input_digest([i['key'] for i in items])}.skipped"
    write_text_atomic(folder / name, json.dumps(items))


def skipped_samples(out: Path, jobs: list) -> list[dict]:
    """The skip records of the current jobs (an image whose line was removed is no longer listed)."""
    digests = {j.key: j.digest for j in jobs}
    items = []
    for record in sorted((out / SKIPPED_DIR).glob("*.skipped")):
        for i in json.loads(record.read_text()):
            if digests.get(i["key"]) == i["digest"]:
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
