"""`ladd-ds synth`: teacher-generated latents in per-bucket MDS datasets, crash-safe, multi-rank."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from ladd_ds.config import load_config
from ladd_ds.data.manifest import generation_guidance_scale, read_negative_prompt
from ladd_ds.generate.state import completed_samples
from ladd_ds.models.registry import build_transformer
from ladd_ds.models.text_encoders import CLIP_TOKENS, build_tiny_text_encoders
from ladd_ds.sampling import TeacherSampler
from tests.conftest import TINY_CONFIG, cli_error, copy_run_until, export, mds_samples, read_metrics, run_cli, train_tiny

PROMPTS = ["a red seven in the top left", "a blue one", "three green twos", "a yellow four", "five", "six six", "seven"]
SETS = [
    "synth.buckets=[[128,128],[64,128]]",
    "synth.num_steps=3",
    "synth.batch_size=2",
    "synth.part_size=2",
    "text.max_sequence_length=32",
]


def synth(prompts, out, nproc=1, check=True, extra=(), launcher="direct"):
    args = ["synth", "--config", str(TINY_CONFIG), "--prompts", str(prompts), "--out", str(out)]
    for s in SETS + list(extra):
        args += ["--set", s]
    return run_cli(*args, nproc=nproc, check=check, launcher=launcher)


def read_all(out):
    """index -> sample, over every bucket's merged index."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for bucket in manifest["buckets"]:
        for s in mds_samples(out / bucket):
            assert s["index"] not in samples, f"prompt {s['index']} twice"
            samples[s["index"]] = s
    return manifest, samples


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "out"
    synth(prompt_file, out)
    return (*read_all(out), out)


def test_every_prompt_once_in_its_bucket_and_reproducible(reference):
    manifest, samples, _ = reference
    assert sorted(samples) == list(range(len(PROMPTS)))
    assert sum(manifest["buckets"].values()) == len(PROMPTS) == manifest["samples"]
    assert manifest["source"]["model"] == "tiny" and manifest["source"]["kind"] == "teacher samples"
    for index, s in samples.items():
        assert s["prompt"] == PROMPTS[index]
        h, w = (int(v) for v in s["bucket"].split("x"))
        assert s["latent"].shape == (4, h // 8, w // 8) and s["latent"].dtype == np.float16
        assert s["prompt_embeds"].shape == (CLIP_TOKENS + 32, 32)  # SD3's full sequence: 77 CLIP + 32 T5
        assert s["prompt_embeds"].dtype == np.float32  # an fp32 run stores its conditioning as fp32
    # (prompt, seed) alone reproduces a sample: sample it again outside the command.
    cfg = load_config(TINY_CONFIG, SETS)
    text = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32)
    sampler = TeacherSampler(build_transformer("tiny", seed=0).eval(), text, cfg.synth.shift, codec_factor=8)
    s = samples[3]
    h, w = (int(v) for v in s["bucket"].split("x"))
    again = sampler.sample(
        [s["prompt"]],
        [int(s["seed"])],
        height=h,
        width=w,
        device="cpu",
        num_steps=cfg.synth.num_steps,
        guidance_scale=cfg.synth.guidance_scale,
    )[0]
    torch.testing.assert_close(again.half(), torch.from_numpy(s["latent"]))


def test_data_records_its_guidance_and_the_empty_prompt(reference):
    """What a guided distillation target needs (ladd.distill_cfg): the generation's guidance scale
    and the empty prompt's conditioning, in the shards' compact form."""
    _, _, out = reference
    cfg = load_config(TINY_CONFIG, SETS)
    assert generation_guidance_scale(out) == cfg.synth.guidance_scale
    embeds, pooled = read_negative_prompt(out, needed_by="test")
    expected_embeds, expected_pooled = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).encode([""])
    assert torch.equal(embeds, expected_embeds[0]) and torch.equal(pooled, expected_pooled[0])


def stored_conditioning(out, prompt):
    """prompt_embeds and pooled of `prompt` as the LADD loader reads them from synth's shards."""
    from ladd_ds.data.loader import build_loader

    dataset = build_loader(out, 1, seed=0, shuffle=False).dataset
    sample = next(dataset[i] for i in range(dataset.num_samples) if dataset[i]["prompt"] == prompt)
    return sample["prompt_embeds"], sample["pooled"]


def test_stored_conditioning_is_what_the_teacher_and_previews_were_fed(reference):
    """One canonical text conditioning: for a prompt, the prompt_embeds and pooled that synth
    stored (fp32 run) and the loader gives training are bitwise what the teacher generated with
    and what the TensorBoard preview feeds (`ladd-ds sample`: test_train_on_synthetic_buckets...)."""
    from ladd_ds.ladd.preview import SamplePreview

    _, samples, out = reference
    prompt = samples[0]["prompt"]
    embeds, pooled = stored_conditioning(out, prompt)
    assert torch.equal(embeds, torch.from_numpy(samples[0]["prompt_embeds"]))
    cfg = load_config(TINY_CONFIG, [*SETS, f"logging.sample_prompts=[{prompt!r}]"])
    sampler = TeacherSampler(
        build_transformer("tiny", seed=0).eval(), build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32), 3.0, 8
    )
    fed = []
    sampler.pipe.transformer.forward = lambda *a, **k: fed.append(k) or (torch.zeros_like(k["hidden_states"]),)
    sampler.sample([prompt], [0], height=64, width=64, device="cpu", num_steps=1, guidance_scale=1.0)
    assert torch.equal(fed[0]["encoder_hidden_states"][0], embeds) and torch.equal(fed[0]["pooled_projections"][0], pooled)
    preview = SamplePreview(cfg, torch.device("cpu"))
    assert torch.equal(preview.embeds[0], embeds) and torch.equal(preview.pooled[0], pooled)


def test_killed_run_continues_without_duplicates_or_gaps(prompt_file, tmp_path, reference):
    out = tmp_path / "out"
    os.environ["LADD_DS_INJECT_FAULTS"] = "kill@3"  # SIGKILL before committing the third part
    try:
        assert synth(prompt_file, out, check=False).returncode != 0
    finally:
        del os.environ["LADD_DS_INJECT_FAULTS"]
    assert not (out / "manifest.json").exists()  # nothing that looks complete
    # Reading the unfinished output points to finishing it, never to deleting resumable parts.
    from ladd_ds.data.schema import validate_mds_dir

    for where in (out, next(out.glob("*x*"))):
        with pytest.raises(FileNotFoundError) as err:
            validate_mds_dir(where)
        assert "run the same command again" in str(err.value) and "delete" not in str(err.value)
    survived = len(completed_samples(out))
    assert 0 < survived < len(PROMPTS)  # two parts were committed before the kill
    proc = synth(prompt_file, out)
    assert f"{survived} already done" in proc.stdout
    _, samples = read_all(out)
    _, ref, _ = reference
    assert sorted(samples) == sorted(ref)
    for index in ref:
        assert np.array_equal(samples[index]["latent"], ref[index]["latent"]), index


def assert_same_samples(samples, ref):
    assert sorted(samples) == sorted(ref)
    for index in ref:
        assert np.array_equal(samples[index]["latent"], ref[index]["latent"]), index


def test_rerun_of_a_finished_output_does_nothing(reference, prompt_file, tmp_path):
    out = shutil.copytree(reference[2], tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = synth(prompt_file, out)
    assert "is complete (7 samples): nothing to do" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_appended_prompts_are_generated_and_indexed(reference, tmp_path):
    out = shutil.copytree(reference[2], tmp_path / "out")
    longer = tmp_path / "prompts.txt"
    longer.write_text("\n".join([*PROMPTS, "eight", "nine nine"]) + "\n")
    proc = synth(longer, out)
    assert "9 samples, 7 already done, 2 to generate" in proc.stdout
    manifest, samples = read_all(out)
    assert manifest["samples"] == 9 and sorted(samples) == list(range(9))
    assert_same_samples({i: samples[i] for i in range(7)}, reference[1])
    # A changed prompt under an existing sample is refused, naming it.
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join(["a red SEVEN", *PROMPTS[1:], "eight", "nine nine"]) + "\n")
    proc = synth(changed, out, check=False)
    assert proc.returncode == 2 and "1 prompts changed since their samples were written" in proc.stderr
    assert "'0', now 'a red SEVEN'" in proc.stderr


def test_kill_while_finalizing_then_rerun_gives_the_same_dataset(prompt_file, tmp_path, reference):
    out = tmp_path / "out"
    os.environ["LADD_DS_INJECT_FAULTS"] = "kill_in_finalize@2"  # after the first bucket's index
    try:
        assert synth(prompt_file, out, check=False).returncode != 0
    finally:
        del os.environ["LADD_DS_INJECT_FAULTS"]
    assert not (out / "manifest.json").exists() and len(list(out.glob("*/index.json"))) == 1
    stale = next(out.glob("*x*")) / ".part-000000009-abcdef01.tmp-12345-0a0b0c0d"  # a killed write's leftover
    stale.mkdir()
    proc = synth(prompt_file, out)
    assert "7 already done, 0 to generate" in proc.stdout and not stale.exists()
    _, samples = read_all(out)
    assert_same_samples(samples, reference[1])


def test_a_resume_with_other_settings_is_refused(prompt_file, tmp_path, reference):
    out = shutil.copytree(reference[2], tmp_path / "out")
    (out / "manifest.json").unlink()  # an unfinished output
    proc = synth(prompt_file, out, check=False, extra=["synth.guidance_scale=2.0", "synth.num_steps=4"])
    assert proc.returncode == 2
    assert "was started with other settings" in proc.stderr and "synth:" in proc.stderr
    assert "'guidance_scale': 5.0" in proc.stderr and "'guidance_scale': 2.0" in proc.stderr
    assert "pass a new --out" in proc.stderr


@pytest.mark.multiproc
def test_two_ranks_split_the_prompts_and_train_on_compressed_checked_shards(prompt_file, tmp_path, reference):
    """2 ranks write zstd shards with hashes: the samples of one rank; 2 ranks train on them;
    a corrupted shard stops a 2-rank run with the shard's name."""
    out = tmp_path / "out"
    synth(prompt_file, out, nproc=2, extra=["data.compression=zstd"])
    _, samples = read_all(out)
    _, ref, _ = reference
    assert sorted(samples) == sorted(ref)
    for index in ref:  # the same sample whichever rank made it
        np.testing.assert_allclose(samples[index]["latent"], ref[index]["latent"], atol=2e-3)
    parts = list(out.glob("*/part-*"))
    assert len(parts) >= 4
    for bucket in json.loads((out / "manifest.json").read_text())["buckets"]:
        shards = json.loads((out / bucket / "index.json").read_text())["shards"]
        assert all(s["compression"] == "zstd" and s["zip_data"]["hashes"]["xxh64"] for s in shards)

    assert "done: step 2" in train_on(out, tmp_path / "run", 2).stdout
    victim = sorted(out.glob("64x128/part-*/*.mds.zstd"))[0]
    victim.with_suffix("").unlink()  # the decompressed copy the first run left: decompressed again
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = train_tiny(tmp_path / "run2", 2, [f"data.path={out}", *TRAIN_SETS], nproc=2, check=False)
    assert proc.returncode != 0
    assert f"{victim.parent.name}/{victim.name}' does not match" in proc.stderr, proc.stderr[-3000:]


def test_bad_inputs(tmp_path, prompt_file, capsys):
    def refused(prompts, out, *extra):
        args = ["synth", "--config", str(TINY_CONFIG), "--prompts", str(prompts), "--out", str(out)]
        return cli_error(capsys, *args, *[a for s in [*SETS, *extra] for a in ("--set", s)])

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "has no prompts" in refused(empty, tmp_path / "o1")
    err = refused(prompt_file, tmp_path / "o2", "synth.buckets=[[100,128]]")
    assert "100x128: height and width must be positive multiples of 16" in err
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "bucket": "256x256"}\n')
    assert "bucket '256x256' is not one of the configured buckets" in refused(jsonl, tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_loader_gives_one_bucket_per_batch(reference):
    from ladd_ds.data.loader import build_loader

    manifest, samples, out = reference
    loader = build_loader(out, 2, seed=0)
    shapes = set()
    seen = []
    for batch in loader:
        assert len({tuple(x.shape) for x in batch["latent"]}) == 1  # one bucket per batch
        shapes.add(tuple(batch["latent"].shape[-2:]))
        seen += batch["sample_id"].tolist()
    assert shapes == {(16, 16), (8, 16)}  # both aspect ratios were served
    assert len(seen) == len(set(seen))


TRAIN_SETS = [
    "data.source=mds",
    "data.micro_batch_size=1",
    "logging.progress_bar=false",
    "ladd.distill_weight=0.5",  # with the guided target: the data's guidance scale
    "checkpoint.every=2",
    "checkpoint.keep_last=5",
    *SETS,  # synth's text settings: training refuses data made with others
]


def train_on(out, run_dir, steps, nproc=2):
    return train_tiny(run_dir, steps, [f"data.path={out}", *TRAIN_SETS], nproc=nproc)


@pytest.fixture(scope="module")
def synth_training(reference, tmp_path_factory):
    """5 steps of LADD on the synthetic multi-bucket data on 2 ranks."""
    _, _, out = reference
    run_dir = tmp_path_factory.mktemp("synth_training") / "run"
    return run_dir, train_on(out, run_dir, 5).stdout


@pytest.mark.multiproc
def test_train_on_synthetic_buckets_with_two_ranks(reference, synth_training, tmp_path, monkeypatch, capsys):
    _, _, out = reference
    args = ["train", "--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "refused")]
    sets = [f"data.path={out}", *TRAIN_SETS[: -len(SETS)]]  # without synth's text settings
    err = cli_error(capsys, *args, *[a for s in sets for a in ("--set", s)])
    assert "text.max_sequence_length = 256, but" in err and "with 32" in err
    run_dir, stdout = synth_training
    assert "done: step 5" in stdout
    guidance = load_config(TINY_CONFIG, SETS).synth.guidance_scale
    assert f"distillation target: teacher x0 with guidance scale {guidance:g}" in stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss/generator"]) for r in records)

    # `ladd-ds sample` feeds the exported student bitwise the conditioning synth stored.
    import ladd_ds.sampling as sampling

    student = export(run_dir, tmp_path / "export")
    prompt = PROMPTS[0]
    embeds, pooled = stored_conditioning(out, prompt)
    fed = []
    monkeypatch.setattr(sampling, "ladd_sample", lambda model, e, p, noise, *rest: fed.append((e, p)) or noise)
    sampling.sample_latents(sampling.load_sampling_model(student), [prompt], [0], height=64, width=64, steps=1, cfg=1.0)
    assert torch.equal(fed[0][0][0], embeds) and torch.equal(fed[0][1][0], pooled)


@pytest.mark.multiproc
def test_zero3_teacher_on_two_ranks_gives_the_same_samples(prompt_file, tmp_path, reference):
    out = tmp_path / "out"
    synth(prompt_file, out, nproc=2, extra=["synth.zero_stage=3"])
    manifest, samples = read_all(out)
    _, ref, _ = reference
    # The teacher's identity does not depend on its placement (read from the spec, not the weights).
    assert manifest["source"]["fingerprint"] == reference[0]["source"]["fingerprint"] == "preset tiny, seed 0"
    assert sorted(samples) == sorted(ref)
    for index in ref:
        np.testing.assert_allclose(samples[index]["latent"], ref[index]["latent"], atol=2e-3)


@pytest.mark.multiproc
def test_resume_on_multi_bucket_data_with_two_ranks_is_exact(reference, synth_training, tmp_path):
    """The loader state of per-bucket streams is restored: after a restart the next batches (and
    so the losses) are those of an uninterrupted run."""
    _, _, out = reference
    whole, _ = synth_training
    split = copy_run_until(whole, tmp_path / "split", 2)  # the run as it was after 2 steps
    assert "step-00000002 at step 2" in train_on(out, split, 5).stdout
    a_records, b_records = (read_metrics(d) for d in (split, whole))
    assert [r["step"] for r in a_records] == [1, 2, 3, 4, 5]
    for a, b in zip(a_records, b_records):
        assert a["loss/generator"] == b["loss/generator"] and a["loss/discriminator"] == b["loss/discriminator"], a["step"]
    for r in range(2):
        ids = [
            torch.load(d / "checkpoints" / "step-00000005" / f"rank-{r:05d}.pt", weights_only=True)["last_sample_ids"]
            for d in (split, whole)
        ]
        assert ids[0] == ids[1]


@pytest.fixture(scope="module")
def tiny_teacher_folder(tmp_path_factory):
    """The tiny preset's weights (seed 0, as the fp32 reference used) as a diffusers folder: a
    ZeRO-3 bf16 build draws a preset's random weights in bf16 under zero.Init, which would be a
    different random teacher; a folder is what real runs load."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    build_transformer("tiny", seed=0).save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("nproc, zero_stage", [(1, 0), (2, 3)], ids=["replicated", "zero3-2ranks"])
def test_bf16_synth(prompt_file, tmp_path, reference, tiny_teacher_folder, nproc, zero_stage):
    """precision bf16 end to end (teacher, text encoders, noise): replicated and with a ZeRO-3
    teacher on 2 ranks; the samples stay close to the fp32 ones (bf16 round-off only)."""
    out = tmp_path / "out"
    extra = ["deepspeed.precision=bf16", f"synth.zero_stage={zero_stage}", f"model.teacher={tiny_teacher_folder}"]
    synth(prompt_file, out, nproc=nproc, extra=extra, launcher="in-process" if nproc == 1 else "direct")
    _, samples = read_all(out)
    _, ref, _ = reference
    assert sorted(samples) == sorted(ref)
    for index in ref:
        a, b = samples[index]["latent"].astype(np.float32), ref[index]["latent"].astype(np.float32)
        assert np.isfinite(a).all() and np.abs(a - b).max() < 0.1 * np.abs(b).max(), index
        assert not np.array_equal(a, b)  # really computed in bf16
