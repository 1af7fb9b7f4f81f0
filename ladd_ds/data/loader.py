"""Read ladd_ds latent shards with mosaicml-streaming, with exact resume.

Resume: `loader.state_dict()` / `loader.load_state_dict(sd)` of StreamingDataLoader store
(epoch, samples consumed in the epoch by all ranks, shuffle seed, num_canonical_nodes). A loader
built afresh, given that state and iterated with `iterate_forever`, yields exactly the batches an
uninterrupted loader would have yielded next, also across epoch boundaries (tests/test_data.py).
Keep the global batch size the same across the restart.

Integrity: every shard is checked against the hash its index.json records (schema.SHARD_HASH)
before it is first read by a loader, once per loader build and machine (`CheckedStream`); a
mismatch stops the loader with an InputError that names the file.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from numpy.typing import NDArray
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.format.base.reader import FileInfo, Reader
from streaming.base.hashing import get_hash, is_hash

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.data.manifest import read_manifest
from ladd_ds.data.schema import INDEX_FILE, LATENTS, MANIFEST_FILE, SHARD_HASH, Layout, validate_mds_dir
from ladd_ds.data.shared_memory import clean_all_streaming_blocks, clean_stale_blocks
from ladd_ds.distributed import ranks
from ladd_ds.distributed.ranks import print0


def stored_tensor(array: np.ndarray) -> torch.Tensor:
    """A column value as a tensor of its stored dtype; uint16 columns hold bfloat16 bits
    (schema.TEXT_STORAGE)."""
    if array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


class CheckedStream(Stream):
    """A Stream whose shard files are checked against the hashes in index.json before they are read.

    streaming checks only the files it downloads (with `validate_hash`), so never the shards of a
    local directory, nor a copy in the cache once downloaded. Here every shard with hashes starts
    as not yet prepared, so that streaming prepares it (once per machine, ahead of reading, in
    its prepare thread) and preparing checks what is there: the raw shard, or the compressed one
    before it is decompressed (next to it for a local directory). Shards without hashes (datasets
    written before they were recorded) are read unchecked.
    """

    def set_up_local(self, shards: list[Reader], cache_usage_per_shard: NDArray[np.int64]) -> None:
        super().set_up_local(shards, cache_usage_per_shard)
        for i, shard in enumerate(shards):
            if any(raw.hashes or (zipped and zipped.hashes) for raw, zipped in shard.file_pairs):
                cache_usage_per_shard[i] = 0  # "absent": prepare_shard (the check) runs on first use

    def _prepare_shard_part(self, raw_info: FileInfo, zip_info: FileInfo | None = None, compression: str | None = None) -> int:
        raw = os.path.join(self.local, self.split, raw_info.basename)
        if os.path.isfile(raw):
            self._check(raw, raw_info)
            return super()._prepare_shard_part(raw_info, zip_info, compression)
        delta = super()._prepare_shard_part(raw_info, zip_info, compression)
        if zip_info is None:
            self._check(raw, raw_info)  # downloaded; a decompressed one comes from a checked file
        return delta

    def _decompress_shard_part(self, zip_info: FileInfo, zip_filename: str, raw_filename: str, compression: str | None) -> None:
        self._check(zip_filename, zip_info)
        super()._decompress_shard_part(zip_info, zip_filename, raw_filename, compression)

    def _check(self, filename: str, info: FileInfo) -> None:
        algos = [a for a in (SHARD_HASH, *sorted(info.hashes)) if a in info.hashes and is_hash(a)]
        if not algos:
            return
        with open(filename, "rb") as f:
            found = get_hash(algos[0], f.read())
        if found != info.hashes[algos[0]]:
            if self.remote is None:
                todo = "Copy the dataset again from where it came from, or regenerate it (ladd-ds synth / encode / pairs)."
            else:
                todo = (
                    f"Delete it, so that it is copied again from {self.remote}; if the error comes back, the shard "
                    "there is corrupt: copy it there again or regenerate the dataset (ladd-ds synth / encode / pairs)."
                )
            raise InputError(
                f"Shard file {filename!r} does not match the {algos[0]} hash in its index.json: the file is corrupted. {todo}"
            )


class LatentDataset(StreamingDataset):
    """StreamingDataset whose samples are tensors in `dtype`, plus their global `sample_id`.

    `sample_id` is the index into the whole dataset, the same whichever rank or worker reads the
    sample, so per-sample noise derived from it does not depend on the world size.

    A corrupt shard (CheckedStream) found by streaming's prepare thread ends the epoch, and the
    error is raised where the batches are read, instead of streaming's "Background thread failed".
    """

    def __init__(self, *, dtype: torch.dtype = torch.float32, layout: Layout = LATENTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtype = dtype
        self.tensor_columns = (*layout.latent_columns, "prompt_embeds", "pooled")
        self.shard_error: InputError | None = None

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except InputError as err:
            # Not prepared: a process that needs it checks it again and fails the same way. (One
            # whose streaming thread is waiting for it, which waits for LOCAL only, stays waiting
            # until the loader or the job stops it; it never reads the shard.)
            self._shard_states[shard_id] = _ShardState.REMOTE
            self.shard_error = err
            if threading.current_thread() is threading.main_thread():
                raise
            self._event.set()  # streaming's threads and the epoch stop; __iter__ raises the error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from super().__iter__()
        if self.shard_error is not None:
            raise self.shard_error

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        # get_item (not __getitem__) is what both indexing and iteration end in, with the
        # index already made non-negative.
        if self.shard_error is not None:
            raise self.shard_error
        shard_id = self.spanner[sample_id][0]
        while self._shard_states[shard_id] != _ShardState.LOCAL:
            self.prepare_shard(shard_id)  # checked before it is read (iteration's threads have done it)
        raw = super().get_item(sample_id, retry)
        sample = {k: stored_tensor(raw[k]).to(self.dtype) for k in self.tensor_columns}
        sample["sample_id"] = int(sample_id)
        sample["prompt"] = raw["prompt"]
        return sample


def collate(samples: list[dict[str, Any]], latent_columns: tuple[str, ...] = ("latent",)) -> dict[str, torch.Tensor]:
    """Stack samples into a dict of tensors.

    Every sample of a batch must have the same shapes: one aspect bucket per batch, and the one
    text conditioning of ladd_ds (SD3's full sequence, see ladd_ds.models.text_encoders), whose
    length is the same for every prompt. Nothing is padded, so a sample's conditioning never
    depends on the other samples of its batch.

    Only tensors go into the batch: StreamingDataLoader counts samples for its state_dict from
    the batch, and a dict of equal-length tensors keeps that count right. Prompt strings are
    dropped; look one up with `loader.dataset[sample_id]['prompt']` when logging.
    """
    for column in latent_columns:
        _check_same_shape(samples, column, "Put each aspect bucket in its own Stream and use batching_method='per_stream'.")
    _check_same_shape(
        samples,
        "prompt_embeds",
        "Every prompt of a dataset has the same text length (CLIP tokens + text.max_sequence_length); "
        "this dataset mixes lengths: it was written by an older ladd-ds (which stored only the real T5 "
        "tokens) or from datasets of different text.max_sequence_length. Regenerate it with "
        "`ladd-ds synth` / `ladd-ds encode`.",
    )
    return {
        **{c: torch.stack([s[c] for s in samples]) for c in latent_columns},  # each (B, C, h, w)
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),  # (B, L, D)
        "pooled": torch.stack([s["pooled"] for s in samples]),  # (B, P)
        "sample_id": torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64),  # (B,)
    }


def _check_same_shape(samples: list[dict[str, Any]], column: str, hint: str) -> None:
    first_shape = samples[0][column].shape
    if any(s[column].shape != first_shape for s in samples):
        shapes = {s["sample_id"]: tuple(s[column].shape) for s in samples}
        raise InputError(f"Column {column!r} has different shapes in one batch (sample_id: shape) {shapes}. {hint}")


_shared_memory_cleaned = False


def clean_stale_shared_memory_once(mode: str = "stale") -> None:
    """Remove the streaming shared memory that ended jobs left behind, once per process, before
    the first dataset is built (call on every rank: local rank 0 cleans, all ranks wait).

    "stale" (default): only blocks no process on the node uses (data/shared_memory.py), so
    another job running on the node keeps its own. "all": streaming's unconditional clean-up,
    which also unlinks a live job's blocks. "off": nothing.
    """
    global _shared_memory_cleaned
    if _shared_memory_cleaned or mode == "off":
        return
    _shared_memory_cleaned = True
    if mode == "all":
        clean_all_streaming_blocks()  # collective itself
        return
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        report = clean_stale_blocks()
        if report.removed:
            print(
                f"removed {len(report.removed)} shared-memory block(s) and lock file(s) of ended jobs "
                f"(kept {len(report.kept_live)} in use)",
                flush=True,
            )
    ranks.barrier()


def bucket_dirs(path: str | Path) -> list[Path]:
    """The per-bucket datasets of a multi-bucket root (as `ladd-ds synth` writes: OUT/<bucket>/
    with its own index.json and OUT/manifest.json), or [] for a single dataset.

    The buckets are those the manifest names (its "buckets": {name: samples}), so one that lost
    its index.json is an error, not left out; a manifest without that key: every sub-directory
    with an index.json."""
    path = Path(path)
    if (path / INDEX_FILE).is_file() or not (path / MANIFEST_FILE).is_file():
        return []
    listed = (read_manifest(path) or {}).get("buckets")
    if listed:
        missing = [b for b in sorted(listed) if not (path / b / INDEX_FILE).is_file()]
        if missing:
            raise MissingInputError(
                f"{path / MANIFEST_FILE} lists bucket(s) {missing} ({', '.join(f'{b}: {listed[b]} samples' for b in missing)}), "
                f"but {path / missing[0] / INDEX_FILE} does not exist: the copy is incomplete; copy the complete "
                "directory again or regenerate the data"
            )
        return [path / b for b in sorted(listed)]
    buckets = sorted(p for p in path.iterdir() if p.is_dir() and (p / INDEX_FILE).is_file())
    if not buckets:
        raise MissingInputError(
            f"{path} has a manifest.json but no bucket directory with an index.json: was the synth run finished?"
        )
    return buckets


_noted_unhashed: set[str] = set()


def note_unhashed(path: str | Path) -> None:
    """Say once per dataset and process that its shards cannot be checked."""
    if str(path) not in _noted_unhashed:
        _noted_unhashed.add(str(path))
        print0(
            f"note: dataset {str(path)!r} has no shard hashes in its index.json (written by an older ladd-ds): "
            "its shards are read unchecked. Regenerate it to have them checked."
        )


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def claim_cache_dir(cache: Path) -> None:
    """Refuse a cache directory that another running job on this machine is using.

    The job is identified by its rendezvous address (MASTER_ADDR:MASTER_PORT, shared by all its
    ranks); a claim whose process is gone is stale and taken over."""
    cache.mkdir(parents=True, exist_ok=True)
    job = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', os.getpid())}"
    claim = cache / ".ladd_ds_job"
    if claim.is_file():
        try:
            other_job, other_pid = claim.read_text().split()
            os.kill(int(other_pid), 0)  # raises if that process is gone
            alive = True
        except (ValueError, ProcessLookupError, PermissionError):
            alive = False
        if alive and other_job != job:
            raise RuntimeError(
                f"cache directory {cache} is in use by another running job ({other_job}, pid {other_pid}); "
                "give this run its own data.cache_dir"
            )
    claim.write_text(f"{job} {os.getpid()}")


def build_loader(
    path: str | Path,
    micro_batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    local_cache: str | Path | None = None,
    remote_buckets: list[str] | None = None,
    layout: Layout = LATENTS,
    buckets: list[Path] | None = None,
    shared_memory_cleanup: str = "stale",
) -> StreamingDataLoader:
    """Build the per-rank loader over the MDS dataset at `path` (batches of `micro_batch_size`).

    `path` is a local directory (one dataset, or a multi-bucket root with manifest.json) or an
    object-store URL that mosaicml-streaming supports (s3://, gs://, ...), which needs
    `local_cache`; `remote_buckets` names a remote root's bucket subdirectories. With
    `local_cache`, shards are copied there before reading. The shuffle order depends only on
    `seed` and the epoch. Building several loaders over one `path` in one process is fine.
    `layout`: the kind of dataset (schema.LATENTS for LADD, schema.PAIRS for DPO). `buckets`:
    the bucket directories of a local multi-bucket root to read (default: all of them;
    the trainer passes those data.checks.plan_mds_data kept). `shared_memory_cleanup`: see
    clean_stale_shared_memory_once.
    """
    if is_remote(path):
        if local_cache is None:
            raise InputError(f"data.path {path} is remote: set data.cache_dir to a local directory for its shards")
        # Streaming reads and checks the remote index itself (we cannot list a bucket here).
        buckets = [f"{str(path).rstrip('/')}/{b}" for b in remote_buckets] if remote_buckets else []
        summary = None
    else:
        buckets = bucket_dirs(path) if buckets is None else [Path(b) for b in buckets]
        summaries = [validate_mds_dir(d, layout) for d in (buckets or [path])]
        summary = {"num_samples": sum(x["num_samples"] for x in summaries)}
        if not all(x["hashed"] for x in summaries):
            note_unhashed(path)
    world_size = ranks.world_size()
    if summary is not None and summary["num_samples"] < micro_batch_size * world_size:
        raise InputError(
            f"Dataset {str(path)!r} has {summary['num_samples']} samples, fewer than "
            f"one global batch ({micro_batch_size} x {world_size} ranks). Write more "
            f"samples or lower the micro batch size."
        )
    if local_cache is not None:
        claim_cache_dir(Path(local_cache))
    ranks.export_local_world_size()
    clean_stale_shared_memory_once(shared_memory_cleanup)

    # With remote=None streaming skips its "Reused local directory" check and gives each
    # dataset its own shared-memory prefix, so several datasets may read one directory.
    common = dict(dtype=dtype, layout=layout, shuffle=shuffle, shuffle_seed=seed, batch_size=micro_batch_size)
    if buckets:
        # One Stream per aspect bucket and per-stream batching: every batch holds one shape.
        streams = [
            CheckedStream(local=str(b))
            if local_cache is None
            else CheckedStream(remote=str(b), local=str(Path(local_cache) / Path(str(b)).name))
            for b in buckets
        ]
        dataset = LatentDataset(streams=streams, batching_method="per_stream", **common)
    else:
        location = {"local": str(path)} if local_cache is None else {"remote": str(path), "local": str(local_cache)}
        dataset = LatentDataset(streams=[CheckedStream(**location)], **common)
    return StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=functools.partial(collate, latent_columns=layout.latent_columns),
        num_workers=num_workers,
        drop_last=True,
        # Pinned batches let batch_to_device copy them to the GPU without the host waiting.
        pin_memory=torch.cuda.is_available(),
    )


HOST_KEYS = ("sample_id",)  # read on the host (noise seeds, checkpoint state): never moved to the device


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a collated batch to `device`, floating-point tensors cast to the training dtype. The
    sample ids stay on the host, so reading them in the step is no device synchronisation.

    To a GPU each tensor goes from pinned memory (the loader pins its batches; another batch is
    pinned here) with non_blocking: a copy from pageable memory makes the host wait for the GPU's
    queued work. The cast to `dtype` runs on the device, after the copy."""
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if k in HOST_KEYS:
            out[k] = v
            continue
        if cuda and not v.is_pinned():
            v = v.pin_memory()
        v = v.to(device, non_blocking=cuda)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def iterate_forever(loader: StreamingDataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches epoch after epoch; streaming advances its epoch counter on each pass.

    An epoch may be empty right after resuming from a state saved at the end of an epoch; two
    empty epochs in a row mean no rank can fill a batch, which would otherwise loop forever.
    """
    empty_epochs = 0
    while empty_epochs < 2:
        empty_epochs += 1
        for batch in loader:
            empty_epochs = 0
            yield batch
    raise RuntimeError(
        f"The loader over {loader.dataset.streams[0].local!r} yielded no batch in "
        f"two epochs: each rank needs at least batch_size={loader.batch_size} "
        f"samples per epoch. Write more samples or lower the micro batch size."
    )
