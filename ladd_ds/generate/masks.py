"""Random inpainting masks (1 = fill in), seeded and reproducible: what `ladd-ds encode --task
inpaint` and `ladd-ds synth --task inpaint` draw for an image without a mask of its own.

The kinds cover what an inpainting model is asked to do (docs/method.md, "Extensions"):
- box: a rectangle 10-60% of each side, anywhere (object removal or replacement);
- stroke: a few thick brush segments (touch-ups along a line);
- border: everything outside a kept rectangle of 40-80% of each side, centred or shifted
  (outpainting);
- quadrant: one quarter of the image (not drawn by default; a simple, well-defined hole).
"""

from __future__ import annotations

import numpy as np
import torch

from ladd_ds.core.errors import InputError

KINDS = ("box", "stroke", "border", "quadrant")
DEFAULT_KINDS = ("box", "stroke", "border")


def check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise InputError(f"mask kinds {list(kinds)}: choose one or more of {list(KINDS)}")
    return kinds


def random_mask(height: int, width: int, *, seed: int, kinds=DEFAULT_KINDS) -> torch.Tensor:
    """A (1, height, width) float mask of 0/1, 1 = fill in: one of `kinds`, drawn with everything
    else from a generator seeded with `seed`. Never empty and never the whole image."""
    kinds = check_kinds(kinds)
    # The kind and the shape from two streams of the seed: a seed gives the same box (or stroke,
    # border) whichever other kinds could have been drawn.
    kind = kinds[np.random.default_rng([seed, 0]).integers(len(kinds))]
    rng = np.random.default_rng([seed, 1])
    mask = np.zeros((height, width), dtype=bool)
    if kind == "box":
        bh, bw = _span(rng, height, 0.1, 0.6), _span(rng, width, 0.1, 0.6)
        top, left = rng.integers(height - bh + 1), rng.integers(width - bw + 1)
        mask[top : top + bh, left : left + bw] = True
    elif kind == "border":
        kh, kw = _span(rng, height, 0.4, 0.8), _span(rng, width, 0.4, 0.8)
        if rng.random() < 0.5:  # centred
            top, left = (height - kh) // 2, (width - kw) // 2
        else:  # shifted: the model extends the image towards one side more than the others
            top, left = rng.integers(height - kh + 1), rng.integers(width - kw + 1)
        mask[:] = True
        mask[top : top + kh, left : left + kw] = False
    elif kind == "quadrant":
        q = rng.integers(4)
        rows = slice(0, height // 2) if q < 2 else slice(height // 2, height)
        cols = slice(0, width // 2) if q % 2 == 0 else slice(width // 2, width)
        mask[rows, cols] = True
    else:
        mask = _strokes(rng, height, width)
    if not mask.any():  # sides of a pixel or two: fill one pixel
        mask[rng.integers(height), rng.integers(width)] = True
    if mask.all():
        mask[rng.integers(height), rng.integers(width)] = False
    return torch.from_numpy(mask.astype(np.float32))[None]  # (1, H, W)


def _span(rng, side: int, low: float, high: float) -> int:
    """A length of `low`..`high` of `side` pixels, at least 1 and at most side - 1 (when side > 1)."""
    return int(np.clip(round(side * rng.uniform(low, high)), 1, max(1, side - 1)))


def _strokes(rng, height: int, width: int) -> np.ndarray:
    """1-4 connected brush segments of random direction and length, radius 3-8% of the shorter
    side; stops early once half the image is covered."""
    radius = max(1.0, min(height, width) * rng.uniform(0.03, 0.08))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    mask = np.zeros((height, width), dtype=bool)
    y, x = rng.uniform(0, height), rng.uniform(0, width)
    for _ in range(rng.integers(1, 5)):
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.6) * max(height, width)
        y2 = float(np.clip(y + length * np.sin(angle), 0, height - 1))
        x2 = float(np.clip(x + length * np.cos(angle), 0, width - 1))
        mask |= _segment_distance(yy, xx, (y, x), (y2, x2)) <= radius
        y, x = y2, x2
        if mask.mean() > 0.5:
            break
    return mask


def _segment_distance(yy, xx, a, b) -> np.ndarray:
    """Distance of every pixel centre to the segment a-b (points as (y, x))."""
    (ay, ax), (by, bx) = a, b
    dy, dx = by - ay, bx - ax
    t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    return np.hypot(yy - (ay + t * dy), xx - (ax + t * dx))
