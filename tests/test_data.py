"""Tests of ladd_ds.data: shard schema, atomic writer, loader, exact resume."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from streaming import MDSWriter
from streaming.base.util import merge_index

from ladd_ds.data import (
    build_loader,
    collate,
    iterate_forever,
    validate_mds_dir,
    write_random_latents,
    write_samples,
)

# 50 samples in many small shards, batches of 4: 12 batches an epoch, 2 samples dropped.
NUM_SAMPLES, BATCH = 50, 4
BATCHES_PER_EPOCH = NUM_SAMPLES // BATCH
SHAPES = dict(latent_shape=(4, 8, 8), text_len=6, text_dim=16, pooled_dim=8)


@pytest.fixture(scope="module")
def random_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "random"
    return write_random_latents(out, num_samples=NUM_SAMPLES, **SHAPES, seed=3, size_limit=4096)


def take(loader, n):
    return list(itertools.islice(iterate_forever(loader), n))


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_round_trip_shapes_and_dtypes(random_ds):
    loader = build_loader(random_ds, BATCH, seed=0, shuffle=False, dtype=torch.bfloat16)
    batch = next(iter(loader))
    assert set(batch) == {"latent", "prompt_embeds", "pooled", "sample_id"}
    assert batch["latent"].shape == (BATCH, 4, 8, 8)
    assert batch["latent"].dtype == torch.bfloat16
    assert batch["prompt_embeds"].shape == (BATCH, 6, 16)
    assert batch["pooled"].shape == (BATCH, 8)
    assert batch["sample_id"].dtype == torch.int64
    for i, sample_id in enumerate(batch["sample_id"].tolist()):
        raw = loader.dataset[sample_id]
        assert raw["prompt"] == f"random sample {sample_id}"
        assert torch.equal(batch["latent"][i], raw["latent"])
        assert torch.equal(batch["prompt_embeds"][i], raw["prompt_embeds"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_text_columns_are_stored_bit_exactly(tmp_path, dtype):
    """The text columns keep the encoders' dtype: fp32 as float32, bf16 as its raw bits; read
    back in that dtype they are bitwise the tensors that were written."""
    embeds, pooled = torch.randn(2, 5, 16).to(dtype) * 1e-3, torch.randn(2, 8).to(dtype) * 300
    rows = [
        {"latent": torch.randn(4, 2, 2), "prompt_embeds": embeds[i], "pooled": pooled[i], "prompt": f"p{i}"} for i in range(2)
    ]
    path = write_samples(tmp_path / "ds", rows)
    stored = {"float32": "ndarray:float32", "bfloat16": "ndarray:uint16", "float16": "ndarray:float16"}
    assert validate_mds_dir(path)["columns"]["prompt_embeds"] == stored[str(dtype).split(".")[1]]
    loader = build_loader(path, 2, seed=0, shuffle=False, dtype=dtype)
    batch = next(iter(loader))
    order = batch["sample_id"].tolist()
    assert torch.equal(batch["prompt_embeds"], embeds[order]) and torch.equal(batch["pooled"], pooled[order])


def test_collate_rejects_mixed_text_lengths():
    samples = [
        {"latent": torch.randn(4, 2, 2), "pooled": torch.randn(8), "sample_id": i, "prompt_embeds": torch.randn(n, 16)}
        for i, n in enumerate([2, 7])
    ]
    with pytest.raises(ValueError, match=r"'prompt_embeds' has different shapes.*text.max_sequence_length"):
        collate(samples)


def test_collate_rejects_mixed_latent_shapes():
    samples = [
        {"latent": torch.randn(4, h, 2), "pooled": torch.randn(8), "sample_id": h, "prompt_embeds": torch.randn(3, 16)}
        for h in (2, 3)
    ]
    with pytest.raises(ValueError, match="per_stream"):
        collate(samples)


def test_sample_ids_unique_within_epoch_and_reshuffled(random_ds):
    loader = build_loader(random_ds, BATCH, seed=0)
    epochs = [torch.cat([b["sample_id"] for b in loader]).tolist() for _ in range(2)]
    for ids in epochs:
        assert len(ids) == BATCHES_PER_EPOCH * BATCH
        assert len(set(ids)) == len(ids)
        assert all(0 <= i < NUM_SAMPLES for i in ids)
    assert epochs[0] != epochs[1], "streaming should reshuffle each epoch"


def test_same_seed_same_order_different_seed_different_order(random_ds):
    ids = [torch.cat([b["sample_id"] for b in build_loader(random_ds, BATCH, seed=s)]).tolist() for s in (1, 1, 2)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


# Stop points: mid epoch 0, right after the last batch of epoch 0, mid epoch 1, end of epoch 1.
@pytest.mark.parametrize("stop", [5, BATCHES_PER_EPOCH, BATCHES_PER_EPOCH + 3, 2 * BATCHES_PER_EPOCH])
def test_resume_is_exact(random_ds, stop):
    # Both loaders live in this process over one directory, as in the trainer's resume test.
    reference = take(build_loader(random_ds, BATCH, seed=7), stop + 15)

    first = build_loader(random_ds, BATCH, seed=7)
    assert_same_batches(take(first, stop), reference[:stop])
    state = first.state_dict()

    resumed = build_loader(random_ds, BATCH, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as if read from a checkpoint
    assert_same_batches(take(resumed, 15), reference[stop:])


def test_resume_twice_across_epoch_boundary(random_ds):
    # The second save happens in an epoch after the one the first resume started in, so the
    # loaded (now stale) resume state must not offset the new epoch's count.
    reference = take(build_loader(random_ds, BATCH, seed=7), 30)
    first = build_loader(random_ds, BATCH, seed=7)
    take(first, 5)
    second = build_loader(random_ds, BATCH, seed=7)
    second.load_state_dict(first.state_dict())
    assert_same_batches(take(second, 13), reference[5:18])
    third = build_loader(random_ds, BATCH, seed=7)
    third.load_state_dict(second.state_dict())
    assert_same_batches(take(third, 12), reference[18:30])


def test_resume_with_workers(random_ds):
    reference = take(build_loader(random_ds, BATCH, seed=7, num_workers=2), 10)
    first = build_loader(random_ds, BATCH, seed=7, num_workers=2)
    take(first, 4)
    resumed = build_loader(random_ds, BATCH, seed=7, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 6), reference[4:])


def test_local_cache_built_twice(random_ds, tmp_path):
    cache = tmp_path / "cache"
    a = next(iter(build_loader(random_ds, BATCH, seed=1, local_cache=cache)))
    b = next(iter(build_loader(random_ds, BATCH, seed=1, local_cache=cache)))
    assert torch.equal(a["sample_id"], b["sample_id"])
    assert (cache / "index.json").is_file()


def test_too_small_dataset_is_rejected(tmp_path):
    path = write_random_latents(tmp_path / "tiny", num_samples=3, **SHAPES)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(path, BATCH, seed=0)


def test_validate_summary(random_ds):
    summary = validate_mds_dir(random_ds)
    assert summary["num_samples"] == NUM_SAMPLES
    assert summary["num_shards"] > 1
    assert summary["columns"]["prompt_embeds"] == "ndarray:float32"  # random latents are fp32 arrays


def test_validate_missing_column_names_path_and_column(tmp_path):
    path = tmp_path / "no_pooled"
    columns = {"latent": "ndarray:float16", "prompt_embeds": "ndarray:float16", "prompt": "str"}
    with MDSWriter(out=str(path), columns=columns) as writer:
        writer.write({"latent": np.zeros((4, 2, 2), np.float16), "prompt": "x", "prompt_embeds": np.zeros((3, 8), np.float16)})
    with pytest.raises(ValueError, match="missing column 'pooled'") as err:
        validate_mds_dir(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="missing column 'pooled'"):
        build_loader(path, 1, seed=0)


def test_validate_wrong_encoding(tmp_path):
    path = tmp_path / "fp32"
    columns = {"latent": "ndarray:float32", "prompt_embeds": "ndarray:float16", "pooled": "ndarray:float16", "prompt": "str"}
    with MDSWriter(out=str(path), columns=columns) as writer:
        writer.write(
            {
                "latent": np.zeros((4, 2, 2), np.float32),
                "prompt": "x",
                "prompt_embeds": np.zeros((3, 8), np.float16),
                "pooled": np.zeros(8, np.float16),
            }
        )
    with pytest.raises(ValueError, match="'latent' as 'ndarray:float32'"):
        validate_mds_dir(path)


def test_validate_missing_dir_index_and_shard(tmp_path, random_ds):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        validate_mds_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)

    no_index = tmp_path / "no_index"
    (no_index / "part0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No index.json") as err:
        validate_mds_dir(no_index)
    # No shard file either: not advised to delete it (it may be the user's own folder).
    assert str(no_index) in str(err.value) and "not an MDS dataset" in str(err.value) and "delete" not in str(err.value)
    (no_index / "shard.00000.mds").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="No index.json") as err:
        validate_mds_dir(no_index)
    assert "interrupted" in str(err.value)
    (no_index / "part0" / "index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merge_index"):
        validate_mds_dir(no_index)

    truncated = shutil.copytree(random_ds, tmp_path / "truncated")
    (truncated / "shard.00001.mds").unlink()
    with pytest.raises(FileNotFoundError, match="'shard.00001.mds'.*is missing"):
        validate_mds_dir(truncated)


def test_validate_merged_sub_datasets(tmp_path):
    for i in range(2):
        write_random_latents(tmp_path / "merged" / f"part{i}", num_samples=5, **SHAPES, seed=i)
    merge_index(str(tmp_path / "merged"), keep_local=True)
    assert validate_mds_dir(tmp_path / "merged")["num_samples"] == 10
    loader = build_loader(tmp_path / "merged", 2, seed=0)
    ids = torch.cat([b["sample_id"] for b in loader]).tolist()
    assert sorted(ids) == list(range(10))


def test_write_random_latents_deterministic_atomic_idempotent(tmp_path):
    a = write_random_latents(tmp_path / "a", num_samples=6, **SHAPES, seed=5)
    b = write_random_latents(tmp_path / "b", num_samples=6, **SHAPES, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "temporary dir left behind"
    for name in ("index.json", "shard.00000.mds"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other = write_random_latents(tmp_path / "c", num_samples=6, **SHAPES, seed=6)
    assert (a / "shard.00000.mds").read_bytes() != (other / "shard.00000.mds").read_bytes()

    # A second call with the same parameters leaves the directory untouched.
    mtime = (a / "shard.00000.mds").stat().st_mtime_ns
    assert write_random_latents(tmp_path / "a", num_samples=6, **SHAPES, seed=5) == a
    assert (a / "shard.00000.mds").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="'seed': \\(5, 6\\)"):
        write_random_latents(tmp_path / "a", num_samples=6, **SHAPES, seed=6)


def test_failed_write_leaves_nothing(tmp_path):
    def samples():
        yield {"latent": np.zeros((4, 2, 2)), "prompt_embeds": np.zeros((3, 8)), "pooled": np.zeros(8), "prompt": "ok"}
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="generator crashed"):
        write_samples(tmp_path / "out", samples())
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match=r"Sample 1 .* lacks column\(s\) \['pooled'\]"):
        write_samples(
            tmp_path / "out",
            [
                {"latent": np.zeros((4, 2, 2)), "prompt_embeds": np.zeros((3, 8)), "pooled": np.zeros(8), "prompt": "ok"},
                {"latent": np.zeros((4, 2, 2)), "prompt_embeds": np.zeros((3, 8)), "prompt": "bad"},
            ],
        )
    assert list(tmp_path.iterdir()) == []


def test_write_samples_accepts_bf16_tensors_and_optional_columns(tmp_path):
    latent = torch.randn(4, 2, 2, dtype=torch.bfloat16)
    path = write_samples(
        tmp_path / "bf16",
        [
            {
                "latent": latent,
                "prompt_embeds": torch.randn(3, 8),
                "pooled": torch.randn(8),
                "prompt": "a cat",
                "bucket": "2x2",
                "seed": 123,
            }
        ],
    )
    assert validate_mds_dir(path)["columns"]["seed"] == "int"
    loader = build_loader(path, 1, seed=0, dtype=torch.bfloat16)
    sample = loader.dataset[0]
    # bf16 -> fp16 -> bf16 is exact for these magnitudes (fp16 has more mantissa bits).
    assert torch.equal(sample["latent"], latent)
    assert sample["sample_id"] == 0 and sample["prompt"] == "a cat"


def test_local_world_size_from_deepspeed_local_size(random_ds, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "placeholder")  # so monkeypatch restores it after
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    build_loader(random_ds, BATCH, seed=0)
    assert os.environ["LOCAL_WORLD_SIZE"] == "1"


def test_truncated_shard_is_reported(tmp_path):
    out = write_random_latents(tmp_path / "ds", num_samples=8, **SHAPES, seed=1)
    shard = sorted(out.glob("*.mds"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard.00000.mds.* has \d+ bytes, its index says \d+: the file is corrupted"):
        validate_mds_dir(out)


def test_remote_with_local_cache_and_cache_claims(tmp_path, random_ds, monkeypatch):
    # streaming accepts a local directory as the "remote": shards are copied into the cache.
    cache = tmp_path / "cache"
    loader = build_loader(random_ds, BATCH, seed=0, shuffle=False, local_cache=cache)
    batch = next(iter(loader))
    assert batch["latent"].shape == (BATCH, 4, 8, 8)
    assert list(cache.glob("*.mds"))  # read through the cache
    # Another live job (this test process stands in for it) holds the cache: refused.
    (cache / ".ladd_ds_job").write_text(f"10.0.0.9:1234 {os.getpid()}")
    with pytest.raises(RuntimeError, match="is in use by another running job"):
        build_loader(random_ds, BATCH, seed=0, local_cache=cache)
    # A claim whose process is gone is stale and taken over.
    (cache / ".ladd_ds_job").write_text("10.0.0.9:1234 999999999")
    build_loader(random_ds, BATCH, seed=0, local_cache=cache)
    with pytest.raises(ValueError, match="is remote: set data.cache_dir"):
        build_loader("s3://bucket/data", BATCH, seed=0)


def test_prompt_file_errors_cite_the_file_line_after_blank_lines(tmp_path):
    """A bad line is reported with its line number in the file, blank lines counted; the sample
    index (a sample's identity) counts prompts only."""
    from ladd_ds.data.prompts import load_prompt_jobs

    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "a"}\n\n\n{"prompt": "b"}\n')
    assert [j.index for j in load_prompt_jobs(good, ["64x64"], None, 0)] == [0, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:4: expected an object with a string 'prompt'"):
        load_prompt_jobs(bad, ["64x64"], None, 0)


def flip_byte(path, at=None):
    """Corrupt `path` in place without changing its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_shards_carry_hashes_and_a_flipped_byte_is_reported(tmp_path):
    """A same-size corruption passes the size check: the shard hashes in index.json catch it, on
    the first read of the shard, in iteration and in direct indexing, and name the file."""
    from ladd_ds.core.errors import InputError

    path = write_random_latents(tmp_path / "ds", num_samples=12, **SHAPES, seed=2, size_limit=4096)
    shards = json.loads((path / "index.json").read_text())["shards"]
    assert all(s["raw_data"]["hashes"].get("xxh64") for s in shards)
    assert len(list(build_loader(path, BATCH, seed=0))) == 3  # intact: read and checked
    flip_byte(path / "shard.00001.mds")
    validate_mds_dir(path)  # the size is right
    with pytest.raises(InputError, match=r"shard.00001.mds'.* does not match .*xxh64.*corrupted.*regenerate"):
        list(build_loader(path, BATCH, seed=0))
    loader = build_loader(path, BATCH, seed=0)
    first_of_shard_1 = shards[0]["samples"]
    assert loader.dataset[0]["sample_id"] == 0  # other shards read fine
    with pytest.raises(InputError, match=r"shard.00001.mds'.* does not match"):
        loader.dataset[first_of_shard_1]


def test_corrupt_shard_reported_from_a_loader_worker(tmp_path):
    import gc

    from ladd_ds.core.errors import InputError

    path = write_random_latents(tmp_path / "ds", num_samples=12, **SHAPES, seed=2, size_limit=4096)
    flip_byte(path / "shard.00002.mds")
    with pytest.raises(InputError, match=r"shard.00002.mds'.* does not match"):
        list(build_loader(path, BATCH, seed=0, num_workers=1))
    gc.collect()  # torch takes ~5 s to stop a worker that raised: count it here


def test_processes_waiting_for_a_corrupt_shard_report_it_too(tmp_path):
    """A shard is checked once per machine, by the first process (loader worker, rank) that needs
    it; the others wait for that check and must then fail too, not read it or wait forever."""
    import multiprocessing
    import time

    from streaming.base.dataset import _ShardState

    from ladd_ds.core.errors import InputError

    path = write_random_latents(tmp_path / "ds", num_samples=12, **SHAPES, seed=2, size_limit=4096)
    flip_byte(path / "shard.00002.mds")
    dataset = build_loader(path, BATCH, seed=0).dataset
    first = int(dataset.sample_offset_per_shard[2])
    dataset._shard_states[2] = _ShardState.PREPARING  # as while another process checks it
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()

    def read(sample_id):
        try:
            dataset[sample_id]
            errors.put("read")
        except InputError as err:
            errors.put(str(err))

    readers = [ctx.Process(target=read, args=(first + i,)) for i in range(2)]
    for p in readers:
        p.start()
    time.sleep(0.5)
    assert all(p.is_alive() for p in readers)  # waiting for the check
    dataset._shard_states[2] = _ShardState.REMOTE
    with pytest.raises(InputError, match=r"shard.00002.mds'.* does not match"):
        dataset[first]  # this process checks it
    for p in readers:
        p.join(timeout=30)
    assert [p.exitcode for p in readers] == [0, 0]
    reported = [errors.get(timeout=1) for _ in readers]
    assert all("shard.00002.mds' does not match" in r for r in reported), reported


def test_cached_copies_are_checked_on_every_build(tmp_path, random_ds):
    """A shard copied into data.cache_dir is checked when copied and again by every later run: a
    copy corrupted in the cache since is reported, not trained on."""
    from ladd_ds.core.errors import InputError

    source = shutil.copytree(random_ds, tmp_path / "source")
    cache = tmp_path / "cache"
    list(build_loader(source, BATCH, seed=0, local_cache=cache))
    flip_byte(cache / "shard.00003.mds")
    with pytest.raises(InputError, match=r"cache/shard.00003.mds'.* does not match"):
        list(build_loader(source, BATCH, seed=0, local_cache=cache))
    (cache / "shard.00003.mds").unlink()  # copied again on the next read
    flip_byte(source / "shard.00003.mds")  # and now the source is corrupt: its copy is refused
    with pytest.raises(InputError, match=r"shard.00003.mds'.* does not match"):
        list(build_loader(source, BATCH, seed=0, local_cache=cache))


def test_datasets_without_hashes_still_load(tmp_path, capsys):
    path = tmp_path / "old"
    columns = {"latent": "ndarray:float16", "prompt_embeds": "ndarray:float32", "pooled": "ndarray:float32", "prompt": "str"}
    with MDSWriter(out=str(path), columns=columns, size_limit=4096) as writer:
        for i in range(8):
            writer.write(
                {
                    "latent": np.zeros((4, 2, 2), np.float16),
                    "prompt_embeds": np.zeros((3, 8), np.float32),
                    "pooled": np.zeros(8, np.float32),
                    "prompt": f"p{i}",
                }
            )
    flip_byte(path / "shard.00000.mds", at=-3)  # nothing to check it against
    for _ in range(2):
        assert len(list(build_loader(path, 2, seed=0))) == 4
    out = capsys.readouterr().out
    assert out.count("has no shard hashes") == 1 and str(path) in out  # one note per dataset


def batches_of(path, **kwargs):
    return [b for b in build_loader(path, 2, seed=0, shuffle=False, **kwargs)]


def test_compressed_shards_read_in_place_through_a_cache_and_as_buckets(tmp_path):
    """zstd shards (data.compression) give the batches of uncompressed ones: read in place (the
    decompressed shard is written next to the compressed one), through data.cache_dir (the
    source is left as it is) and as a multi-bucket root; a corrupt compressed shard is named."""
    from ladd_ds.core.errors import InputError

    rows = [
        {"latent": torch.randn(4, 2, 2), "prompt_embeds": torch.zeros(5, 16), "pooled": torch.randn(8), "prompt": f"p{i}"}
        for i in range(8)
    ]
    plain = write_samples(tmp_path / "plain", rows, size_limit=1024)
    packed = write_samples(tmp_path / "zstd", rows, size_limit=1024, compression="zstd")
    assert not list(packed.glob("*.mds")) and list(packed.glob("*.mds.zstd"))
    zipped = sum(f.stat().st_size for f in packed.glob("*.zstd"))
    assert zipped < 0.8 * sum(f.stat().st_size for f in plain.glob("*.mds"))  # zero text compresses
    reference = batches_of(plain)
    source = shutil.copytree(packed, tmp_path / "source")
    assert_same_batches(batches_of(source, local_cache=tmp_path / "cache"), reference)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in packed.iterdir())
    assert_same_batches(batches_of(packed), reference)
    assert {p.name for p in packed.glob("*.mds")} == {p.name[: -len(".zstd")] for p in packed.glob("*.zstd")}
    assert_same_batches(batches_of(packed), reference)  # decompressed before: read as it is

    root = tmp_path / "buckets"
    for bucket in ("2x2", "2x4"):
        write_samples(root / bucket, [{**r, "latent": torch.randn(4, 2, int(bucket[-1]))} for r in rows], compression="zstd")
    (root / "manifest.json").write_text("{}")
    assert {tuple(b["latent"].shape[-2:]) for b in batches_of(root)} == {(2, 2), (2, 4)}

    broken = shutil.copytree(packed, tmp_path / "broken", ignore=shutil.ignore_patterns("*.mds"))
    flip_byte(broken / "shard.00001.mds.zstd")
    with pytest.raises(InputError, match=r"shard.00001.mds.zstd'.* does not match"):
        batches_of(broken)


def test_unknown_compression_is_refused_with_the_key(tmp_path):
    from ladd_ds.config import ConfigError

    row = {"latent": torch.zeros(4, 2, 2), "prompt_embeds": torch.zeros(3, 8), "pooled": torch.zeros(8), "prompt": "x"}
    with pytest.raises(ConfigError, match=r"compression: 'lz4' is not one of .*'zstd'"):
        write_samples(tmp_path / "out", [row], compression="lz4")
    assert not (tmp_path / "out").exists()
