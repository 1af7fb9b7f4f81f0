"""Prompt lists for synthetic data: a text file (one prompt per line) or JSONL objects with
`prompt` and optional `bucket` ("HxW") and `seed`. Buckets not given in the file are drawn with a
seeded RNG from the configured weights, so the assignment is reproducible."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ladd_ds.core.errors import InputError, MissingInputError


@dataclass(frozen=True)
class PromptJob:
    index: int  # position among the file's prompts (which rank makes it: index % world)
    prompt: str
    bucket: str  # "HxW" in pixels
    seed: int
    image: str | None = None  # `ladd-ds encode`: the image file of this caption
    key: str = ""  # the sample's stable identity: str(index) for synth, the image's relative path for encode
    digest: str = ""  # of the inputs the sample is made from: a re-run checks that they did not change
    other_image: str | None = None  # `ladd-ds pairs --import-pairs`: the loser image (`image`: the winner)
    # `ladd-ds encode`: the image files' size and mtime (and the image limits): a sample skipped
    # under another stamp is retried (state.skip_digest)
    stamp: str = ""
    skip: str = ""  # why the sample cannot be made, found before any model runs; its bucket is then UNREADABLE


def input_digest(*values) -> str:
    """A short digest of JSON-serializable values: what a sample was made from."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def bucket_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse_bucket(name: str) -> tuple[int, int]:
    h, _, w = name.partition("x")
    return int(h), int(w)


def read_utf8(path: Path, what: str) -> str:
    """The text of `what` file `path`, which must be UTF-8 (not the locale's encoding: a prompt
    file must read the same on every machine of a job); a bad byte is an error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def numbered_lines(path: str | Path, *, what: str, expected: str) -> list[tuple[int, str]]:
    """(line number in the file, text) of every non-blank line of `what` file `path` (error
    messages cite the file's own line numbers, blank lines included); a missing or empty file is
    an error saying what it should hold (`expected`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist; pass a file of {expected}")
    lines = [(n, line) for n, line in enumerate(read_utf8(path, what).splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{what} {path} has no {expected}; write at least one")
    return lines


def prompt_record(path: Path, n: int, line: str) -> dict:
    """Line `n` of a prompt file: {"prompt": line} of a text file, the object of a JSONL line (a
    string "prompt", optionally "bucket" and "seed")."""
    if path.suffix != ".jsonl":
        return {"prompt": line}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: not valid JSON ({e}); fix or remove the line") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise InputError(f"{path}:{n}: expected an object with a string 'prompt'; fix or remove the line")
    return record


def load_prompt_jobs(path: str | Path, buckets: list[str], weights: list[float] | None, seed: int) -> list[PromptJob]:
    path = Path(path)
    lines = numbered_lines(path, what="prompt file", expected="prompts (one per line, or JSONL with a 'prompt' key)")
    draw = random.Random(seed)
    jobs = []
    for index, (n, line) in enumerate(lines):  # index: the sample's identity; n: its line
        record = prompt_record(path, n, line)
        bucket = record.get("bucket")
        drawn = draw.choices(buckets, weights=weights)[0]  # drawn for every line: stable per index
        if bucket is None:
            bucket = drawn
        elif bucket not in buckets:
            raise InputError(f"{path}:{n}: bucket {bucket!r} is not one of the configured buckets {buckets}")
        sample_seed = record.get("seed", seed * 1_000_003 + index)
        if not isinstance(sample_seed, int):
            raise InputError(f"{path}:{n}: 'seed' must be an integer")
        jobs.append(
            PromptJob(
                index=index,
                prompt=record["prompt"],
                bucket=bucket,
                seed=sample_seed,
                key=str(index),
                digest=input_digest(record["prompt"], bucket, sample_seed),
            )
        )
    return jobs
