"""The demo's pixel-cleanliness measures (ladd_ds.demo.pixels): hue purity and background level."""

import colorsys

import pytest
import torch

from ladd_ds.demo import digits
from ladd_ds.demo.pixels import GLYPH_VALUE, hue_degrees, hue_tolerance, pixel_cleanliness


@pytest.fixture(scope="module")
def renders():
    """Held-out renders of both buckets: (images, labels) per bucket."""
    out = []
    for k, bucket in enumerate(digits.BUCKETS):
        samples = digits.make_samples(16, "heldout", seed=5 + k, bucket=bucket)
        out.append((torch.stack([s[0] for s in samples]), [s[1] for s in samples]))
    return out


def test_hue_is_the_hsv_hue():
    rgb = torch.rand(200, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([360.0 * colorsys.rgb_to_hsv(*c.tolist())[0] for c in rgb])
    diff = (hue_degrees(rgb) - expected).abs()
    assert torch.minimum(diff, 360.0 - diff).max() < 1e-3


def test_the_tolerance_is_a_quarter_of_the_closest_palette_colors_gap():
    hues = sorted(float(hue_degrees(torch.tensor(c))) for c in digits.COLORS.values())
    gaps = [b - a for a, b in zip(hues, hues[1:])] + [hues[0] + 360 - hues[-1]]
    assert hue_tolerance() == pytest.approx(min(gaps) / 4)


def test_real_renders_are_pure_on_a_black_background(renders):
    for images, labels in renders:
        assert pixel_cleanliness(images, labels) == {"hue_purity": 1.0, "background": 0.0}


def test_speckle_lowers_purity_by_its_share_and_haze_raises_the_background(renders):
    images, labels = renders[0]
    noisy = images.clone()
    glyph = noisy.amax(1) >= GLYPH_VALUE  # (N, H, W)
    expected = []
    for i, label in enumerate(labels):
        # Every other glyph pixel gets the color two palette entries away (never within tolerance).
        names = list(digits.COLORS)
        other = torch.tensor(digits.COLORS[names[(names.index(label.color) + 2) % len(names)]])
        ys, xs = glyph[i].nonzero(as_tuple=True)
        hit = slice(0, None, 2)
        noisy[i, :, ys[hit], xs[hit]] = other[:, None] * noisy[i, :, ys[hit], xs[hit]].amax(0, keepdim=True)
        expected.append(1.0 - len(ys[hit]) / len(ys))
    assert pixel_cleanliness(noisy, labels)["hue_purity"] == pytest.approx(sum(expected) / len(expected))
    # A haze of 3/255 on the black canvas: the background reads 3 (the glyph and its edge left out).
    hazy = images.clone()
    hazy[images == 0] = 3.0 / 255.0
    stats = pixel_cleanliness(hazy, labels)
    assert stats["hue_purity"] == 1.0 and stats["background"] == pytest.approx(3.0, abs=1e-4)


def test_an_image_without_a_glyph_has_no_pure_pixel(renders):
    images, labels = renders[0]
    blank = torch.zeros_like(images[:2])
    assert pixel_cleanliness(blank, labels[:2]) == {"hue_purity": 0.0, "background": 0.0}
    with pytest.raises(ValueError, match="one label each"):
        pixel_cleanliness(blank, labels[:3])
