"""`ladd-ds encode`: captioned images -> VAE latents in the bucket of nearest aspect ratio."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ladd_ds.data.images import ImageLimits
from ladd_ds.generate.encode import load_cropped, nearest_bucket
from ladd_ds.models.codec import VAECodec
from ladd_ds.models.vae import build_tiny_vae
from tests.conftest import TINY_CONFIG, cli_error, mds_samples, run_cli

SETS = ["synth.buckets=[[64,64],[64,128],[128,64]]", "synth.batch_size=2", "text.max_sequence_length=32"]


def encode(images, captions, out, *sets):
    args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions), "--out", str(out)]
    for s in [*SETS, *sets]:
        args += ["--set", s]
    return run_cli(*args, launcher="in-process")


def write_png(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def skip_records(out) -> list[str]:
    """The keys in every skip record of `out`, as often as they are recorded."""
    return sorted(i["key"] for r in (out / "skipped").glob("*.skipped") for i in json.loads(r.read_text()))


def all_samples(out) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s for bucket in manifest["buckets"] for s in mds_samples(out / bucket)]


def test_nearest_bucket_and_center_crop(tmp_path):
    buckets = ["64x64", "64x128", "128x64"]
    assert nearest_bucket(200, 100, buckets) == "64x128"  # wide image -> wide bucket (H x W)
    assert nearest_bucket(90, 200, buckets) == "128x64"
    assert nearest_bucket(100, 110, buckets) == "64x64"
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 140:160] = 255  # a white stripe in the middle
    Image.fromarray(img).save(tmp_path / "x.png")
    x = load_cropped(str(tmp_path / "x.png"), 64, 128)
    assert x.shape == (3, 64, 128) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 64].mean() > 0.9 and x[:, :, 0].mean() < -0.9  # the stripe stays centred


def test_encode_writes_normalized_latents_per_bucket(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (80, 80), "b.png": (200, 90), "c.jpg": (60, 130), "d.png": (150, 70)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": f, "caption": f"picture {f}"}) + "\n" for f in sizes))
    out = tmp_path / "out"
    encode(images, captions, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == {"64x64": 1, "64x128": 2, "128x64": 1}
    codec = VAECodec(build_tiny_vae(4, seed=0))
    for s in mds_samples(out / "64x128"):
        name = list(sizes)[s["index"]]
        assert s["prompt"] == f"picture {name}" and s["latent"].shape == (4, 8, 16)
        expected = codec.encode(load_cropped(str(images / name), 64, 128)[None])[0]
        torch.testing.assert_close(torch.from_numpy(s["latent"]).float(), expected, atol=2e-3, rtol=1e-3)


def test_encode_bad_inputs(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    captions = tmp_path / "c.tsv"
    captions.write_text("missing.png\ta caption\n")
    args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions)]
    err = cli_error(capsys, *args, "--out", str(tmp_path / "out"), *[a for s in SETS for a in ("--set", s)])
    assert "none of its 1 lines has its images in" in err and "missing.png, file not found" in err and "check --images" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_images_are_skipped_recorded_and_never_lose_work(tmp_path):
    """An undecodable and a truncated image are skipped with their reasons; the others are
    encoded; a re-run does nothing; removing the bad lines re-finalizes without them; samples
    keep their keys (relative paths) when lines move. EXIF orientation is applied."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (80, 80), "sub/b.png": (200, 90), "c.png": (150, 70)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "garbage.png").write_bytes(b"not an image at all" * 10)
    full = images / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    (images / "truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    # A 60x130 (wide) pixel array shown rotated: EXIF orientation 6 makes it 130 high, 60 wide.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (60, 130, 3), dtype=np.uint8)).save(images / "rotated.jpg", exif=exif)
    names = ["a.png", "garbage.png", "sub/b.png", "truncated.jpg", "c.png", "rotated.jpg"]
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{n}\tpicture {n}\n" for n in names))
    out = tmp_path / "out"
    proc = encode(images, captions, out)
    assert "skipped 2" in proc.stdout and "garbage.png: cannot identify" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(i["key"], i["reason"].split(":")[0]) for i in manifest["skipped"]] == [
        ("garbage.png", "cannot identify the image file (not a decodable image)"),
        ("truncated.jpg", "does not decode"),
    ]
    assert manifest["samples"] == 4 and manifest["buckets"] == {"64x64": 1, "64x128": 2, "128x64": 1}
    tall = mds_samples(out / "128x64")
    assert tall[0]["prompt"] == "picture rotated.jpg"  # the EXIF-rotated image is tall

    assert "nothing to do" in encode(images, captions, out).stdout
    # The bad lines removed and the good ones reordered: the same samples, no re-encoding.
    captions.write_text("".join(f"{n}\tpicture {n}\n" for n in ["c.png", "rotated.jpg", "a.png", "sub/b.png"]))
    proc = encode(images, captions, out)
    assert "4 samples, 4 already done, 0 to generate" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 4 and manifest["skipped"] == []


@pytest.mark.multiproc
def test_two_ranks_encode_what_one_rank_does(tmp_path):
    """2 ranks split the images (each reads only its own headers), skip the same bad, missing and
    tiny images and give the samples and the manifest of one rank. The bad image fixed, 2 ranks
    retry it (its skip was recorded by the other rank than rank 0, which drops stale skips)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    names = []
    for i in range(8):
        w, h = (90, 80) if i % 2 else (200, 96)
        names.append(f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / names[-1])
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    write_png(images / "tiny.png", 1, 1)
    names[3:3] = ["broken.png", "gone.png", "tiny.png"]  # broken.png: index 3, rank 1's
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{n}\tpicture {n}\n" for n in names))
    encode(images, captions, tmp_path / "one")
    args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions)]
    run_cli(*args, "--out", str(tmp_path / "two"), *[a for s in SETS for a in ("--set", s)], nproc=2)

    def read(out):
        manifest = json.loads((out / "manifest.json").read_text())
        samples = {}
        for bucket in manifest["buckets"]:
            samples.update({s["prompt"]: s["latent"] for s in mds_samples(out / bucket)})
        return manifest, samples

    (m1, s1), (m2, s2) = read(tmp_path / "one"), read(tmp_path / "two")
    assert m1["buckets"] == m2["buckets"] == {"64x64": 4, "64x128": 4}
    assert m2["skipped"] == m1["skipped"] and [i["key"] for i in m1["skipped"]] == ["broken.png", "gone.png", "tiny.png"]
    assert sorted(s1) == sorted(s2) and len(s1) == 8
    for prompt, latent in s1.items():
        np.testing.assert_allclose(s2[prompt], latent, atol=2e-3)

    write_png(images / "broken.png", 90, 80, seed=3)
    proc = run_cli(*args, "--out", str(tmp_path / "two"), *[a for s in SETS for a in ("--set", s)], nproc=2)
    assert "11 samples, 10 already done, 1 to generate" in proc.stdout, proc.stdout
    manifest, samples = read(tmp_path / "two")
    assert [i["key"] for i in manifest["skipped"]] == skip_records(tmp_path / "two") == ["gone.png", "tiny.png"]
    assert manifest["samples"] == len(samples) == 9 and "picture broken.png" in samples


def test_a_fixed_image_is_retried_and_appending_captions_after_it_never_sticks(tmp_path):
    """A corrupt image (of the same byte size as the good one) is skipped; replaced by the good one
    it is retried by the same command, with no caption changed; captions appended later work; the
    sample exists once, its skip record is gone. A skip record of a written sample (what earlier
    versions left after a retry) is dropped instead of stopping every later run."""
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", 80, 80)
    write_png(images / "b.png", 200, 90, seed=1)
    good = (images / "b.png").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2 : len(bad) // 2 + 64] = bytes(64)  # the header decodes, the pixel data does not
    (images / "b.png").write_bytes(bytes(bad))
    captions = tmp_path / "captions.tsv"
    captions.write_text("a.png\tpicture a\nb.png\tpicture b\n")
    out = tmp_path / "out"
    encode(images, captions, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["key"] for i in manifest["skipped"]] == ["b.png"] and manifest["samples"] == 1
    assert "nothing to do" in encode(images, captions, out).stdout  # an unchanged skip holds

    mtime = (images / "b.png").stat().st_mtime_ns
    (images / "b.png").write_bytes(good)  # fixed: the same size, another modification time
    os.utime(images / "b.png", ns=(mtime + 10**9, mtime + 10**9))
    assert len(good) == len(bad)
    proc = encode(images, captions, out)
    assert "2 samples, 1 already done, 1 to generate" in proc.stdout, proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [] and manifest["samples"] == 2 and skip_records(out) == []

    write_png(images / "c.png", 90, 80, seed=2)
    with captions.open("a") as f:
        f.write("c.png\tpicture c\n")
    proc = encode(images, captions, out)
    assert "3 samples, 2 already done, 1 to generate" in proc.stdout, proc.stdout
    prompts = sorted(s["prompt"] for s in all_samples(out))
    assert prompts == ["picture a", "picture b", "picture c"]  # b exactly once

    # A dataset stuck by an earlier version: its skip record still lists b, written since.
    (out / "skipped").mkdir(exist_ok=True)
    (out / "skipped" / "rank-00000-000001-old.skipped").write_text(
        json.dumps([{"key": "b.png", "digest": "0123456789abcdef", "file": str(images / "b.png"), "reason": "does not decode"}])
    )
    assert "nothing to do" in encode(images, captions, out).stdout
    assert skip_records(out) == []


def test_image_limits_default_from_the_buckets():
    limits = ImageLimits.for_buckets(["128x128", "128x192"])
    assert (limits.min_side, limits.max_aspect) == (64, 3.0)  # half of 128; twice 192 / 128
    assert limits.violation(1, 1) == (
        "image is 1x1 pixels, smaller than data.min_image_side = 64 (the default: half the smallest bucket side)"
    )
    assert limits.violation(20000, 20).startswith("image is 20000x20 pixels, smaller than data.min_image_side")
    assert limits.violation(20000, 200) == (
        "image is 20000x200 pixels, aspect ratio 100 beyond data.max_aspect_ratio = 3 "
        "(the default: twice the most elongated bucket's ratio)"
    )
    assert limits.violation(64, 64) == limits.violation(300, 100) == limits.violation(100, 300) == ""
    assert ImageLimits.for_buckets(["128x128"], min_side=1, max_aspect=2000.0).violation(20000, 20) == ""


def test_missing_tiny_and_elongated_images_are_skipped_with_their_reasons(tmp_path, capsys):
    """A captioned file that is not on disk, a 1x1 image and a 2000x20 strip are skipped and listed
    (the buckets' side is 64 at least, their ratio 2 at most); the good images are encoded. The
    missing file put in place, or the limits set lower, the skips are retried by the same command."""
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", 80, 80)
    write_png(images / "tiny.png", 1, 1)
    write_png(images / "strip.png", 2000, 20)
    (images / "notes.txt").write_text("not an image")
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{n}\tpicture {n}\n" for n in ["a.png", "gone.png", "tiny.png", "strip.png", "notes.txt"]))
    out = tmp_path / "out"
    proc = encode(images, captions, out)
    assert "gone.png: file not found" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 1
    default = "data.min_image_side = 32 (the default: half the smallest bucket side)"
    assert {i["key"]: i["reason"] for i in manifest["skipped"]} == {
        "gone.png": "file not found",
        "notes.txt": "not an image file name (expected one of ['.bmp', '.jpeg', '.jpg', '.png', '.webp'])",
        "strip.png": f"image is 2000x20 pixels, smaller than {default}",
        "tiny.png": f"image is 1x1 pixels, smaller than {default}",
    }
    write_png(images / "gone.png", 90, 80)
    assert "5 samples, 4 already done, 1 to generate" in encode(images, captions, out).stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2 and [i["key"] for i in manifest["skipped"]] == ["notes.txt", "strip.png", "tiny.png"]
    # Other limits: the skips are retried under them (the records replaced, each listed once).
    proc = encode(images, captions, out, "data.min_image_side=16", "data.max_aspect_ratio=50")
    assert "5 samples, 2 already done, 3 to generate" in proc.stdout, proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {i["key"]: i["reason"] for i in manifest["skipped"]} == {
        "notes.txt": "not an image file name (expected one of ['.bmp', '.jpeg', '.jpg', '.png', '.webp'])",
        "strip.png": "image is 2000x20 pixels, aspect ratio 100 beyond data.max_aspect_ratio = 50",
        "tiny.png": "image is 1x1 pixels, smaller than data.min_image_side = 16",
    }
    assert skip_records(out) == ["notes.txt", "strip.png", "tiny.png"]
    assert sorted(s["prompt"] for s in all_samples(out)) == ["picture a.png", "picture gone.png"]
    bad_values = [("data.min_image_side=0", "data.min_image_side: must be >= 1"), ("data.max_aspect_ratio=0.5", "must be >= 1")]
    for bad, what in bad_values:
        args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions)]
        assert what in cli_error(capsys, *args, "--out", str(tmp_path / "o"), "--set", bad)
