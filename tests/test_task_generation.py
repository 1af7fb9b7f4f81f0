"""The generation side of inpainting and editing: sampling from a condition (`ladd-ds sample
--image/--mask`), random inpainting masks, `ladd-ds encode --task` and `ladd-ds synth --task`."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ladd_ds.cli import main
from ladd_ds.core.errors import InputError
from ladd_ds.data.images import load_cropped
from ladd_ds.generate.encode import mask_seed
from ladd_ds.generate.masks import KINDS, random_mask
from ladd_ds.models.codec import VAECodec
from ladd_ds.models.conditioning import condition_channels, inpaint_condition, latent_mask, widen_input_channels
from ladd_ds.models.registry import build_transformer
from ladd_ds.models.text_encoders import build_tiny_text_encoders
from ladd_ds.models.vae import build_tiny_vae
from ladd_ds.sampling import SamplingModel, TeacherSampler, load_sampling_model, sample_latents, task_condition
from tests.conftest import TINY_CONFIG, cli_error, mds_samples, run_cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def noisy_condition_weights(transformer, latent: int, seed: int = 0):
    """Nonzero weights for a widened transformer's condition channels (training would move them)."""
    weight = transformer.pos_embed.proj.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        extra = weight[:, latent:]
        extra.copy_(torch.randn(extra.shape, generator=gen).to(weight) * 0.3)
    return transformer


# -- random masks ---------------------------------------------------------------------------


def test_random_masks_are_seeded_varied_and_never_empty_or_full():
    for h, w in [(16, 16), (64, 128), (8, 24)]:
        fractions, kinds_seen = [], set()
        for seed in range(60):
            m = random_mask(h, w, seed=seed)
            assert m.shape == (1, h, w) and m.dtype == torch.float32
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(m, random_mask(h, w, seed=seed))  # reproducible
            assert 0 < m.mean() < 1
            fractions.append(m.mean().item())
            kinds_seen.update(k for k in KINDS if torch.equal(m, random_mask(h, w, seed=seed, kinds=(k,))))
        assert kinds_seen == {"box", "stroke", "border"}  # the default kinds, each drawn
        assert 0.1 < np.mean(fractions) < 0.6, np.mean(fractions)
        assert not torch.equal(random_mask(h, w, seed=0), random_mask(h, w, seed=1))
    border = random_mask(32, 32, seed=3, kinds=("border",))
    assert border[0, 0, 0] == 1 and border[0, -1, -1] == 1  # outpainting: the corners are filled in
    box = random_mask(100, 100, seed=5, kinds=("box",))[0]
    rows, cols = box.any(1).sum().item(), box.any(0).sum().item()
    assert 10 <= rows <= 60 and 10 <= cols <= 60 and box.sum() == rows * cols  # one rectangle
    quadrant = random_mask(16, 16, seed=0, kinds=("quadrant",))
    assert quadrant.sum() == 64
    with pytest.raises(InputError, match="mask kinds"):
        random_mask(16, 16, seed=0, kinds=("circle",))


# -- sampling with a condition ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts():
    text = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32)
    return text, VAECodec(build_tiny_vae(4, seed=0))


@pytest.mark.parametrize(
    "task, kind, precision",
    [("inpaint", "teacher", "fp32"), ("inpaint", "student", "bf16"), ("edit", "teacher", "bf16"), ("edit", "student", "fp32")],
)
def test_a_widened_model_samples_what_the_t2i_one_does_until_its_condition_weights_move(tiny_parts, precision, kind, task):
    _, codec = tiny_parts
    dtype = DTYPES[precision]
    text = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).to("cpu", dtype)
    cfg = 3.0 if kind == "teacher" else 1.0
    base = SamplingModel(build_transformer("tiny", seed=0, dtype=dtype).eval(), text, codec, kind)
    wide = replace(base, transformer=build_transformer("tiny", seed=0, dtype=dtype, task=task).eval())
    prompts, seeds = ["a red seven", "a blue one", "two"], [1, 2, 3]
    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.stack([random_mask(32, 48, seed=s) for s in range(3)]) if task == "inpaint" else None
    condition = task_condition(wide, task, images, masks)
    assert condition.shape == (3, condition_channels(task, 4), 4, 6)
    expected = inpaint_condition(codec, images, masks) if task == "inpaint" else (codec.encode(images),)
    torch.testing.assert_close(condition, torch.cat(expected, 1))

    reference = sample_latents(base, prompts, seeds, height=32, width=48, steps=2, cfg=cfg, batch_size=2)
    same = sample_latents(wide, prompts, seeds, height=32, width=48, steps=2, cfg=cfg, batch_size=2, condition=condition)
    assert same.shape == reference.shape == (3, 4, 4, 6) and same.dtype == dtype
    assert torch.equal(same, reference)  # zero condition weights: exactly the t2i model

    noisy_condition_weights(wide.transformer, 4)
    moved = sample_latents(wide, prompts, seeds, height=32, width=48, steps=2, cfg=cfg, batch_size=2, condition=condition)
    other = sample_latents(wide, prompts, seeds, height=32, width=48, steps=2, cfg=cfg, batch_size=2, condition=condition.flip(0))
    assert torch.isfinite(moved.float()).all()
    assert (moved.float() - reference.float()).abs().amax() > 1e-2  # the condition changes the sample
    torch.testing.assert_close(other[1], moved[1])  # sample i sees condition i: the middle one is unchanged
    assert (other[0].float() - moved[0].float()).abs().amax() > 1e-2
    # Batching does not change a sample: the condition is sliced with its prompts.
    one = sample_latents(wide, prompts[2:], seeds[2:], height=32, width=48, steps=2, cfg=cfg, condition=condition[2:])
    torch.testing.assert_close(one[0].float(), moved[2].float(), atol=1e-2 if precision == "bf16" else 1e-5, rtol=0)


def test_the_condition_must_fit_the_model(tiny_parts):
    text, codec = tiny_parts
    t2i = SamplingModel(build_transformer("tiny", seed=0).eval(), text, codec, "teacher")
    inpaint = replace(t2i, transformer=build_transformer("tiny", seed=0, task="inpaint").eval())
    condition = torch.zeros(1, 5, 4, 4)
    with pytest.raises(InputError, match="text-to-image model: it takes no image condition"):
        sample_latents(t2i, ["a"], [0], height=32, width=32, steps=2, cfg=2.0, condition=condition)
    with pytest.raises(InputError, match="inpaint model: it samples from an image condition; pass --image and --mask"):
        sample_latents(inpaint, ["a"], [0], height=32, width=32, steps=2, cfg=2.0)
    with pytest.raises(InputError, match=r"shape \(1, 4, 4, 4\); this inpaint model needs \(1, 5, 4, 4\)"):
        sample_latents(inpaint, ["a"], [0], height=32, width=32, steps=2, cfg=2.0, condition=condition[:, :4])
    with pytest.raises(InputError, match="this model's task is inpaint: a condition for edit does not fit it"):
        task_condition(inpaint, "edit", torch.zeros(1, 3, 32, 32))


def test_teacher_guidance_keeps_the_condition_in_both_branches(tiny_parts):
    """CFG batches [unconditional, conditional]: the wrapped transformer sees the condition in both."""
    text, _ = tiny_parts
    transformer = noisy_condition_weights(build_transformer("tiny", seed=0, task="edit").eval(), 4)
    sampler = TeacherSampler(transformer, text, 3.0, 8)
    condition = torch.randn(2, 4, 4, 4)
    fed = []
    inner_forward = transformer.forward
    transformer.forward = lambda *a, **k: fed.append(k["hidden_states"]) or inner_forward(*a, **k)
    sampler.sample(["a", "b"], [0, 1], height=32, width=32, device="cpu", num_steps=2, guidance_scale=3.0, condition=condition)
    assert len(fed) == 2 and all(x.shape == (4, 8, 4, 4) for x in fed)
    for x in fed:
        torch.testing.assert_close(x[:, 4:], condition.repeat(2, 1, 1, 1))
    # The same sampler samples without a condition again when given none (a t2i call after).
    sampler.transformer = build_transformer("tiny", seed=0).eval()
    assert sampler.sample(["a"], [0], height=32, width=32, device="cpu", num_steps=1, guidance_scale=3.0).shape == (1, 4, 4, 4)


# -- ladd-ds sample --image / --mask ------------------------------------------------------------


def task_teacher_folder(demo_teacher, out, task):
    """The demo teacher folder with its transformer widened for `task` and nonzero condition weights."""
    from diffusers import SD3Transformer2DModel

    shutil.copytree(demo_teacher, out)
    transformer = SD3Transformer2DModel.from_pretrained(demo_teacher, subfolder="transformer")
    latent = transformer.config.in_channels
    widen_input_channels(transformer, condition_channels(task, latent))
    shutil.rmtree(out / "transformer")
    noisy_condition_weights(transformer, latent).save_pretrained(out / "transformer")
    return out


@pytest.fixture(scope="module")
def task_teachers(small_demo_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("task_teachers")
    return {task: task_teacher_folder(small_demo_teacher, root / task, task) for task in ("inpaint", "edit")}


def write_image(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sample_command_inpaints_and_pastes_back(task_teachers, tmp_path, precision):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven\na blue one\n")
    image = write_image(tmp_path / "image.png", 16, 16, 0)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:9] = 255  # white = fill in
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "grid"
    args = ["sample", "--model", str(task_teachers["inpaint"]), "--prompts", str(prompts), "--steps", "2", "--cfg", "2"]
    args += ["--per-prompt", "2", "--precision", precision, "--image", str(image)]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(out)]) == 0
    result = np.load(out.with_suffix(".npz"))["images"]
    pasted = np.load(tmp_path / "grid_pasted.npz")
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid_pasted.png").is_file()
    assert result.shape == pasted["images"].shape == (4, 16, 16, 3)
    assert pasted["prompt_index"].tolist() == [0, 0, 1, 1]
    hole = mask > 0
    source = np.asarray(Image.open(image))
    for i in range(4):
        assert np.array_equal(pasted["images"][i][~hole], source[~hole])  # the kept area is the image's
        assert np.array_equal(pasted["images"][i][hole], result[i][hole])  # the hole is the sample's
    # Another mask gives other samples: the condition reaches the model.
    mask[:] = 0
    mask[:8] = 255
    Image.fromarray(mask).save(tmp_path / "top_mask.png")  # not top.png: that is where --out top writes
    assert main([*args, "--mask", str(tmp_path / "top_mask.png"), "--out", str(tmp_path / "top")]) == 0
    assert not np.array_equal(np.load(tmp_path / "top.npz")["images"], result)


def test_sample_command_edits_an_image(task_teachers, tmp_path):
    prompts = tmp_path / "instructions.txt"
    prompts.write_text("make it green\n")
    args = ["sample", "--model", str(task_teachers["edit"]), "--prompts", str(prompts), "--steps", "2", "--per-prompt", "2"]
    for seed in (0, 1):  # a 24x40 picture, cut to the 16x16 sample size
        write_image(tmp_path / f"source{seed}.png", 24, 40, seed)
        assert main([*args, "--image", str(tmp_path / f"source{seed}.png"), "--out", str(tmp_path / f"edit{seed}")]) == 0
    a, b = (np.load(tmp_path / f"edit{seed}.npz")["images"] for seed in (0, 1))
    assert a.shape == (2, 16, 16, 3) and not np.array_equal(a, b)
    assert not (tmp_path / "edit0_pasted.npz").exists()


def test_sample_command_condition_errors(task_teachers, small_demo_teacher, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red seven\n")
    image = write_image(tmp_path / "image.png", 16, 16, 0)
    base = ["sample", "--prompts", str(prompts), "--steps", "1", "--out", str(tmp_path / "x")]
    err = cli_error(capsys, *base, "--model", str(small_demo_teacher), "--image", str(image))
    assert "--image: a text-to-image model takes no image" in err
    err = cli_error(capsys, *base, "--model", str(task_teachers["inpaint"]), "--image", str(image))
    assert "this is an inpaint model: pass --mask" in err
    err = cli_error(capsys, *base, "--model", str(task_teachers["edit"]))
    assert "this is an edit model: pass --image" in err
    err = cli_error(capsys, *base, "--model", str(task_teachers["edit"]), "--image", str(image), "--mask", str(image))
    assert "--mask: an edit model takes no mask" in err
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black.png")
    err = cli_error(
        capsys, *base, "--model", str(task_teachers["inpaint"]), "--image", str(image), "--mask", str(tmp_path / "black.png")
    )
    assert "no white pixels" in err
    assert not (tmp_path / "x.npz").exists()
    assert load_sampling_model(task_teachers["edit"]).transformer.config.in_channels == 24


# -- ladd-ds encode --task ---------------------------------------------------------------------

SETS = ["synth.buckets=[[64,64],[64,128]]", "synth.batch_size=2", "synth.part_size=2", "text.max_sequence_length=32"]


def command(name, *args, sets=()):
    full = [name, "--config", str(TINY_CONFIG), *args]
    for s in [*SETS, *sets]:
        full += ["--set", s]
    return run_cli(*full, launcher="in-process")


def read(out):
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for bucket in manifest["buckets"]:
        samples.update({s["index"]: s for s in mds_samples(out / bucket)})
    return manifest, samples


def close(stored, expected):
    """A stored fp16 column against its fp32 value."""
    torch.testing.assert_close(torch.from_numpy(np.array(stored)).float(), expected.float(), atol=3e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(80, 80), (200, 90), (70, 64), (150, 70)]):
        write_image(images / f"img{i}.png", h, w, i)
    (images / "broken.png").write_bytes(b"not an image")
    return images


def test_encode_inpaint_writes_targets_masks_and_conditions(image_folder, tmp_path, capsys):
    names = ["img0.png", "img1.png", "broken.png", "img2.png", "img3.png"]
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{n}\tpicture {n}\n" for n in names))
    out = tmp_path / "inpaint"
    proc = command("encode", "--images", str(image_folder), "--captions", str(captions), "--out", str(out), "--task", "inpaint")
    assert "skipped 1" in proc.stdout
    manifest, samples = read(out)
    assert manifest["buckets"] == {"64x64": 2, "64x128": 2} and manifest["source"]["task"] == "inpaint"
    codec = VAECodec(build_tiny_vae(4, seed=0))
    kinds = set()
    for index, s in samples.items():
        name = names[index]
        h, w = (int(v) for v in s["bucket"].split("x"))
        image = load_cropped(str(image_folder / name), h, w)[None]
        assert int(s["seed"]) == mask_seed(0, name)  # synth.seed 0: the mask is random_mask(h, w, seed)
        pixel_mask = random_mask(h, w, seed=int(s["seed"]))[None]
        kinds.add(next(k for k in KINDS if torch.equal(pixel_mask[0], random_mask(h, w, seed=int(s["seed"]), kinds=(k,)))))
        assert s["latent"].shape == s["condition"].shape == (4, h // 8, w // 8) and s["mask"].shape == (1, h // 8, w // 8)
        close(s["latent"], codec.encode(image)[0])
        masked, small_mask = inpaint_condition(codec, image, pixel_mask)
        close(s["condition"], masked[0])
        assert np.array_equal(s["mask"], small_mask[0].numpy().astype(np.float16))
        assert 0 < s["mask"].mean() < 1
    assert len(kinds) >= 2
    # A re-run does nothing; the same output with another task is refused, naming the setting.
    args = ["--images", str(image_folder), "--captions", str(captions), "--out", str(out)]
    assert "nothing to do" in command("encode", *args, "--task", "inpaint").stdout
    err = cli_error(capsys, "encode", "--config", str(TINY_CONFIG), *args, *[a for s in SETS for a in ("--set", s)])
    assert "task: 'inpaint' then, None now" in err
    err = cli_error(capsys, "encode", "--config", str(TINY_CONFIG), *args, "--task", "inpaint", "--mask-kinds", "box")
    assert "mask_kinds" in err


def test_encode_edit_reads_triples(image_folder, tmp_path, capsys):
    triples = tmp_path / "edits.jsonl"
    lines = [
        ("img1.png", "img3.png", "make it wider"),
        ("img0.png", "img2.png", "make it green"),
        ("img2.png", "img0.png", "undo"),
        ("img0.png", "gone.png", "a target not on disk"),  # skipped with its reason, not an abort
        ("broken.png", "img0.png", "a source that does not decode"),
    ]
    triples.write_text("".join(json.dumps({"source": a, "target": b, "prompt": p}) + "\n" for a, b, p in lines))
    out = tmp_path / "edit"
    command("encode", "--images", str(image_folder), "--captions", str(triples), "--out", str(out), "--task", "edit")
    manifest, samples = read(out)
    assert manifest["buckets"] == {"64x64": 2, "64x128": 1}
    assert [(i["key"], i["reason"]) for i in manifest["skipped"]] == [
        ("broken.png -> img0.png", "source broken.png: cannot identify the image file (not a decodable image)"),
        ("img0.png -> gone.png", "target gone.png: file not found"),
    ]
    codec = VAECodec(build_tiny_vae(4, seed=0))
    for index, s in samples.items():
        source, target, prompt = lines[index]
        h, w = (int(v) for v in s["bucket"].split("x"))
        assert s["prompt"] == prompt and "mask" not in s
        close(
            s["latent"], codec.encode(load_cropped(str(image_folder / target), h, w)[None])[0]
        )  # the target, cut to the source's bucket
        close(s["condition"], codec.encode(load_cropped(str(image_folder / source), h, w)[None])[0])
    assert samples[0]["bucket"] == "64x128"  # the source's (wide) bucket, whatever the target's shape
    assert (
        "nothing to do"
        in command(
            "encode", "--images", str(image_folder), "--captions", str(triples), "--out", str(out), "--task", "edit"
        ).stdout
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "img0.png", "prompt": "x"}) + "\n")
    err = cli_error(
        capsys,
        "encode",
        "--config",
        str(TINY_CONFIG),
        "--images",
        str(image_folder),
        "--captions",
        str(bad),
        "--out",
        str(tmp_path / "o"),
        "--task",
        "edit",
    )
    assert "expected a JSON object with 'source', 'target' and 'prompt'" in err


# -- ladd-ds synth --task -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_task_teachers(tmp_path_factory):
    """The tiny preset widened for each task, with nonzero condition weights, as diffusers folders."""
    root = tmp_path_factory.mktemp("tiny_task_teachers")
    folders = {}
    for task in ("inpaint", "edit"):
        transformer = noisy_condition_weights(build_transformer("tiny", seed=0, task=task), 4)
        transformer.save_pretrained(root / task / "transformer")
        folders[task] = root / task
    build_transformer("tiny", seed=0).save_pretrained(root / "t2i" / "transformer")
    folders["t2i"] = root / "t2i"
    return folders


SYNTH = ["synth.num_steps=2", "synth.guidance_scale=3.0"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_synth_inpaint_samples_targets_from_conditions(tiny_task_teachers, image_folder, tmp_path, precision, capsys):
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(tmp_path / "top.png")
    shutil.copy(image_folder / "img0.png", tmp_path / "img0.png")
    shutil.copy(image_folder / "img1.png", tmp_path / "img1.png")
    shutil.copy(image_folder / "broken.png", tmp_path / "broken.png")
    lines = [
        {"prompt": "a red seven", "image": "img0.png", "mask": "top.png"},
        {"prompt": "a blue one", "image": "img1.png"},
        {"prompt": "broken", "image": "broken.png"},
        {"prompt": "three", "image": "img0.png", "seed": 7},
    ]
    prompts = tmp_path / "inpaint.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    sets = [*SYNTH, f"model.teacher={tiny_task_teachers['inpaint']}", f"deepspeed.precision={precision}"]
    proc = command("synth", "--prompts", str(prompts), "--out", str(out), "--task", "inpaint", sets=sets)
    assert "skipped 1" in proc.stdout
    manifest, samples = read(out)
    assert sorted(samples) == [0, 1, 3] and manifest["buckets"] == {"64x64": 2, "64x128": 1}
    # Each sample again, outside the command: its condition from the image and mask, then the teacher.
    dtype = DTYPES[precision]
    text = build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32).to("cpu", dtype)
    codec = VAECodec(build_tiny_vae(4, seed=0))
    teacher = build_transformer(str(tiny_task_teachers["inpaint"]), task="inpaint", dtype=dtype).eval()
    sampler = TeacherSampler(teacher, text, 3.0, 8)
    for index, s in samples.items():
        h, w = (int(v) for v in s["bucket"].split("x"))
        assert s["prompt"] == lines[index]["prompt"]
        image = load_cropped(str(tmp_path / lines[index]["image"]), h, w)[None]
        pixel_mask = (
            torch.from_numpy(mask[None, None] / 255.0).float() if index == 0 else random_mask(h, w, seed=int(s["seed"]))[None]
        )
        assert index != 3 or int(s["seed"]) == 7
        masked, small = inpaint_condition(codec, image, pixel_mask)
        close(s["condition"], masked[0])
        assert np.array_equal(s["mask"], small[0].numpy().astype(np.float16))
        again = sampler.sample(
            [s["prompt"]],
            [int(s["seed"])],
            height=h,
            width=w,
            device="cpu",
            num_steps=2,
            guidance_scale=3.0,
            condition=torch.cat([masked, small], 1),
        )
        tol = 0.05 if precision == "bf16" else 3e-3
        torch.testing.assert_close(torch.from_numpy(np.array(s["latent"])).float(), again[0].float(), atol=tol, rtol=tol)
    assert torch.equal(
        latent_mask(torch.from_numpy(mask[None, None] / 255.0).float(), 8)[0],
        torch.from_numpy(np.array(samples[0]["mask"])).float(),
    )
    # Re-run: nothing to do; a t2i teacher is refused with what to do.
    assert (
        "nothing to do" in command("synth", "--prompts", str(prompts), "--out", str(out), "--task", "inpaint", sets=sets).stdout
    )
    t2i = [*SYNTH, f"model.teacher={tiny_task_teachers['t2i']}"]
    err = cli_error(
        capsys,
        "synth",
        "--config",
        str(TINY_CONFIG),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
        "--task",
        "inpaint",
        *[a for s in [*SETS, *t2i] for a in ("--set", s)],
    )
    assert "is a t2i transformer; `ladd-ds synth --task inpaint` needs a teacher trained for inpaint" in err
    assert "pretrain or fine-tune one" in err


def test_synth_edit_samples_from_the_source(tiny_task_teachers, image_folder, tmp_path):
    lines = [{"prompt": "make it green", "image": "img1.png"}, {"prompt": "make it a seven", "image": "img2.png"}]
    (tmp_path / "sources").mkdir()
    for r in lines:
        shutil.copy(image_folder / r["image"], tmp_path / "sources" / r["image"])
    prompts = tmp_path / "edit.jsonl"  # image paths relative to the file's folder
    prompts.write_text("".join(json.dumps({**r, "image": f"sources/{r['image']}"}) + "\n" for r in lines))
    out = tmp_path / "out"
    sets = [*SYNTH, f"model.teacher={tiny_task_teachers['edit']}"]
    command("synth", "--prompts", str(prompts), "--out", str(out), "--task", "edit", sets=sets)
    manifest, samples = read(out)
    assert manifest["buckets"] == {"64x64": 1, "64x128": 1} and manifest["source"]["task"] == "edit"
    codec = VAECodec(build_tiny_vae(4, seed=0))
    teacher = build_transformer(str(tiny_task_teachers["edit"]), task="edit").eval()
    sampler = TeacherSampler(teacher, build_tiny_text_encoders("tiny", seed=0, max_sequence_length=32), 3.0, 8)
    for index, s in samples.items():
        h, w = (int(v) for v in s["bucket"].split("x"))
        source = codec.encode(load_cropped(str(image_folder / lines[index]["image"]), h, w)[None])
        close(s["condition"], source[0])
        again = sampler.sample(
            [s["prompt"]], [int(s["seed"])], height=h, width=w, device="cpu", num_steps=2, guidance_scale=3.0, condition=source
        )
        close(s["latent"], again[0])


@pytest.mark.multiproc
def test_zero3_inpaint_synth_on_two_ranks_gives_the_one_rank_samples(tiny_task_teachers, image_folder, tmp_path):
    """A ZeRO-3 teacher on 2 ranks with unequal work (one rank holds the broken image, the other
    one batch fewer): the ranks keep their forwards in step and write what one rank writes."""
    names = ["img0.png", "img1.png", "broken.png", "img2.png", "img3.png"]
    for name in names:
        shutil.copy(image_folder / name, tmp_path / name)
    prompts = tmp_path / "inpaint.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"picture {i}", "image": n}) + "\n" for i, n in enumerate(names)))
    sets = [*SYNTH, f"model.teacher={tiny_task_teachers['inpaint']}"]
    command("synth", "--prompts", str(prompts), "--out", str(tmp_path / "one"), "--task", "inpaint", sets=sets)
    args = ["synth", "--config", str(TINY_CONFIG), "--prompts", str(prompts), "--out", str(tmp_path / "two"), "--task", "inpaint"]
    run_cli(*args, *[a for s in [*SETS, *sets, "synth.zero_stage=3"] for a in ("--set", s)], nproc=2)
    (m1, s1), (m2, s2) = read(tmp_path / "one"), read(tmp_path / "two")
    assert m1["buckets"] == m2["buckets"] == {"64x64": 2, "64x128": 2}
    assert [i["key"] for i in m2["skipped"]] == [i["key"] for i in m1["skipped"]] == ["2"]
    assert sorted(s1) == sorted(s2) == [0, 1, 3, 4]
    for index in s1:
        for column in ("latent", "condition", "mask"):
            np.testing.assert_allclose(s2[index][column], s1[index][column], atol=2e-3)
