"""`ladd-ds encode`: captioned images -> VAE latents in the bucket of nearest aspect ratio."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ladd_ds.generate.encode import load_cropped, nearest_bucket
from ladd_ds.models.codec import VAECodec
from ladd_ds.models.vae import build_tiny_vae
from tests.conftest import TINY_CONFIG, cli_error, mds_samples, run_cli

SETS = ["synth.buckets=[[64,64],[64,128],[128,64]]", "synth.batch_size=2", "text.max_sequence_length=32"]


def encode(images, captions, out):
    args = ["encode", "--config", str(TINY_CONFIG), "--images", str(images), "--captions", str(captions), "--out", str(out)]
    for s in SETS:
        args += ["--set", s]
    return run_cli(*args, launcher="in-process")


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
    assert "image missing.png not found" in err
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
    """2 ranks split the images (each reads only its own headers), skip the same bad image and
    give the samples and the manifest of one rank."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    names = []
    for i in range(8):
        w, h = (90, 80) if i % 2 else (200, 96)
        names.append(f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / names[-1])
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    names.insert(3, "broken.png")
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
    assert [i["key"] for i in m2["skipped"]] == [i["key"] for i in m1["skipped"]] == ["broken.png"]
    assert sorted(s1) == sorted(s2) and len(s1) == 8
    for prompt, latent in s1.items():
        np.testing.assert_allclose(s2[prompt], latent, atol=2e-3)
