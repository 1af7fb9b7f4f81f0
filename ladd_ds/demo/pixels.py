"""Pixel statistics of the demo's images that see color and texture noise, which the classifier's
FD and alignment barely do (a CNN trained to read digit, color and place is nearly invariant to
chroma speckle on a glyph or a faint haze on the black background):

- hue purity: the share of glyph pixels (brightest channel >= GLYPH_VALUE) whose hue lies
  within hue_tolerance() of the asked-for color's hue: a quarter of the palette's smallest hue
  gap (red to yellow, 52.5 degrees), so a pure pixel is far nearer its own color than any other.
  A rendered digit is its 8x8 intensities times one color, so every glyph pixel of a real image
  has exactly that hue (purity 1). Half the gap (a pixel merely nearer its color than another)
  lets much of a 1-step student's chroma speckle count as pure (docs/demo.md, "Pixel
  cleanliness", has both measured);
- background level: the mean pixel value (mean of the three channels, in 1/255) of the canvas
  away from the glyph, i.e. outside the glyph pixels grown by BACKGROUND_MARGIN pixels (a real
  render's background is exactly 0 there, apart from the faint strokes of its own digit below
  GLYPH_VALUE).

Both are computed per image and averaged over a batch (docs/demo.md, "Pixel cleanliness").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ladd_ds.demo import digits

GLYPH_VALUE = 0.25  # a pixel whose brightest channel reaches this belongs to the glyph
BACKGROUND_MARGIN = 1  # pixels around the glyph left out of the background (anti-aliased edges)


def hue_degrees(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of RGB values (..., 3) (the HSV hexcone's hue; 0 for grays)."""
    r, g, b = rgb.unbind(-1)
    top, bottom = rgb.max(-1).values, rgb.min(-1).values
    span = (top - bottom).clamp_min(1e-8)
    hue = torch.where(top == r, ((g - b) / span) % 6.0, torch.where(top == g, (b - r) / span + 2.0, (r - g) / span + 4.0))
    return (60.0 * hue) % 360.0


def _palette_hues() -> dict[str, float]:
    return {name: float(hue_degrees(torch.tensor(rgb))) for name, rgb in digits.COLORS.items()}


def hue_tolerance() -> float:
    """A quarter of the smallest hue gap between two palette colors (degrees)."""
    hues = sorted(_palette_hues().values())
    gaps = [b - a for a, b in zip(hues, hues[1:])] + [hues[0] + 360.0 - hues[-1]]
    return min(gaps) / 4.0


def _hue_distance(a: torch.Tensor, b: float) -> torch.Tensor:
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


def pixel_cleanliness(images: torch.Tensor, labels: list[digits.DigitLabel]) -> dict[str, float]:
    """Hue purity and background level (in 1/255) of `images` (N, 3, H, W) in [0, 1], each
    image's own values averaged over the batch. An image without glyph pixels counts as purity 0
    (no pixel has the asked-for hue); one whose glyph covers the canvas has no background and is
    left out of that mean."""
    if images.ndim != 4 or images.shape[1] != 3 or len(labels) != len(images):
        raise ValueError(f"images must be (N, 3, H, W) with one label each; got {tuple(images.shape)}, {len(labels)} labels")
    images = images.float().clamp(0, 1)
    hues = _palette_hues()
    tolerance = hue_tolerance()
    glyph = images.amax(1) >= GLYPH_VALUE  # (N, H, W)
    k = 2 * BACKGROUND_MARGIN + 1
    near = F.max_pool2d(glyph[:, None].float(), k, stride=1, padding=BACKGROUND_MARGIN)[:, 0] > 0
    pixel_hue = hue_degrees(images.movedim(1, -1))  # (N, H, W)
    value = images.mean(1) * 255.0
    purity, background = [], []
    for i, label in enumerate(labels):
        on = glyph[i]
        pure = _hue_distance(pixel_hue[i][on], hues[label.color]) <= tolerance
        purity.append(float(pure.float().mean()) if on.any() else 0.0)
        away = ~near[i]
        if away.any():
            background.append(float(value[i][away].mean()))
    return {
        "hue_purity": sum(purity) / len(purity),
        "background": sum(background) / len(background) if background else math.nan,
    }
