"""Colored digits placed on a larger canvas, in two aspect ratios, with prompts that name the
digit, its color and its place ("a red seven in the top left").

Source images: scikit-learn's bundled 8x8 digits (1,797 images, shipped with the package; no
download). Each sample scales one digit, colors it and puts it at a random position inside the
named region of a black canvas. Train and held-out splits use disjoint source digits.

"Latent" space: instead of a VAE, a documented invertible map (ladd_ds.models.codec,
"pixel-unshuffle"). An RGB image in [0, 1] of shape (3, H, W) becomes x = 2 * image - 1
rearranged by pixel-unshuffle with factor 2 into (12, H/2, W/2), the channel layout the
transformer sees; `from_latent` is its exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ladd_ds.models.codec import PixelUnshuffleCodec

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {
    "red": (1.0, 0.2, 0.2),
    "green": (0.2, 1.0, 0.3),
    "blue": (0.3, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.2),
}
PLACES = ["top left", "top right", "bottom left", "bottom right"]
PROMPT_WORDS = sorted({"a", "in", "the", *DIGIT_WORDS, *COLORS, *(w for p in PLACES for w in p.split())})
BUCKETS = [(16, 16), (16, 24)]  # (height, width) in pixels: square and wide
CODEC = PixelUnshuffleCodec(factor=2)  # (3, H, W) -> (12, H/2, W/2)
LATENT_CHANNELS = CODEC.channels
# The 8x8 source digit is drawn at its own size and fills a quadrant of the square canvas; in the
# wide one it sits anywhere along its half's width. Digits drawn at 8-11 px with random offsets
# in 24x24 / 24x36 canvases (4x4-pixel tokens) stayed at chance in 1,500 steps; at 8 px in
# quadrants of 2x2-pixel tokens the teacher reads 0.45 after 1,500 steps (docs/demo.md, "Making
# the demo teacher draw digits").
MIN_SIZE, MAX_SIZE = 8, 8
HELD_OUT_FROM = 1500  # source digits [0, 1500) train, [1500, 1797) held out


def data_identity() -> dict:
    """The settings that define the rendered data (part of a cached teacher's key)."""
    return {"buckets": BUCKETS, "digit_size": [MIN_SIZE, MAX_SIZE], "codec_factor": CODEC.factor, "colors": COLORS}


@dataclass(frozen=True)
class DigitLabel:
    digit: int
    color: str
    place: str | None  # None: the prompt leaves the place open ("a red seven"), any quadrant will do

    @property
    def prompt(self) -> str:
        where = "" if self.place is None else f" in the {self.place}"
        return f"a {self.color} {DIGIT_WORDS[self.digit]}{where}"


def parse_prompt(prompt: str) -> DigitLabel:
    """The labels a prompt asks for (inverse of DigitLabel.prompt)."""
    words = prompt.split()
    placed = len(words) == 7 and words[3:5] == ["in", "the"]
    if not (placed or len(words) == 3) or words[0] != "a" or words[2] not in DIGIT_WORDS:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return DigitLabel(DIGIT_WORDS.index(words[2]), words[1], " ".join(words[5:]) if placed else None)


def open_places(label: DigitLabel) -> list[str]:
    """Where a digit of a prompt without a place may be drawn: every quadrant whose (digit, color,
    place) combination is not held out, so such prompts never produce a held-out combination."""
    return [p for p in PLACES if DigitLabel(label.digit, label.color, p) not in HELD_OUT_COMBINATIONS]


def load_source_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) float images in [0, 1] and their labels, for 'train' or 'heldout'."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    sl = slice(0, HELD_OUT_FROM) if split == "train" else slice(HELD_OUT_FROM, None)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return images[sl], data.target[sl]


def render(digit: np.ndarray, label: DigitLabel, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """(3, height, width) image in [0, 1]: the 8x8 digit scaled, colored, placed in its region
    (for a label without a place, in a quadrant drawn from `open_places`)."""
    if label.place is None:
        places = open_places(label)
        label = DigitLabel(label.digit, label.color, places[int(rng.integers(len(places)))])
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))  # digit size in pixels; it stays inside its quadrant
    glyph = torch.from_numpy(digit)
    if size != glyph.shape[-1]:  # at the source size, bilinear resampling is the identity
        glyph = F.interpolate(glyph[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    top_half, left_half = label.place.startswith("top"), label.place.endswith("left")
    rows = (0, height // 2 - size) if top_half else (height // 2, height - size)
    cols = (0, width // 2 - size) if left_half else (width // 2, width - size)
    top = int(rng.integers(rows[0], rows[1] + 1))
    left = int(rng.integers(cols[0], cols[1] + 1))
    image = torch.zeros(3, height, width)
    color = torch.tensor(COLORS[label.color])[:, None, None]
    image[:, top : top + size, left : left + size] = glyph.clamp(0, 1) * color
    return image


def _held_out_combinations() -> frozenset[DigitLabel]:
    """20 of the 160 (digit, color, place) combinations, two per digit, that the demo keeps out of
    synth, the student's training and the DPO pairs: the held-out prompt set. Every digit, color
    and place still occurs in training, only not in these combinations."""
    colors = list(COLORS)
    out = set()
    for d in range(10):
        for k in (0, 2):
            out.add(DigitLabel(d, colors[(d + k) % 4], PLACES[(d + d // 4 + k + k // 2) % 4]))
    return frozenset(out)


HELD_OUT_COMBINATIONS = _held_out_combinations()
PROMPT_SETS = ("all", "seen", "held_out")  # which combinations random_label may draw


def random_label(
    rng: np.random.Generator, digit: int | None = None, combinations: str = "all", open_place: float = 0.0
) -> DigitLabel:
    """A uniformly drawn label (with `digit` fixed if given) from `combinations`: "all", "seen"
    (not held out) or "held_out" (HELD_OUT_COMBINATIONS). With probability `open_place` the
    label leaves the place open (never for "held_out": the held-out set is of combinations)."""
    if combinations not in PROMPT_SETS:
        raise ValueError(f"combinations must be one of {PROMPT_SETS}, got {combinations!r}")
    while True:
        label = DigitLabel(
            int(rng.integers(10)) if digit is None else digit, str(rng.choice(list(COLORS))), str(rng.choice(PLACES))
        )
        if combinations == "all" or (label in HELD_OUT_COMBINATIONS) == (combinations == "held_out"):
            break
    # Drawn only when asked for, so that labels without open places are those of earlier versions.
    if open_place > 0.0 and combinations != "held_out" and rng.random() < open_place:
        return DigitLabel(label.digit, label.color, None)
    return label


def make_samples(
    n: int,
    split: str,
    *,
    seed: int,
    bucket: tuple[int, int] | None = None,
    source=None,
    combinations: str = "all",
    open_place: float = 0.0,
) -> list[tuple[torch.Tensor, DigitLabel, tuple[int, int]]]:
    """n (image, label, bucket) triples, reproducible from (split, seed); the bucket of each is
    random unless `bucket` is given. `source`: load_source_digits(split), to skip reloading.
    `combinations`, `open_place`: which labels to draw (see random_label); a label without a
    place keeps None (its prompt), its image has the digit in some quadrant."""
    images, targets = source if source is not None else load_source_digits(split)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i = int(rng.integers(len(images)))
        label = random_label(rng, int(targets[i]), combinations, open_place)
        hw = bucket or BUCKETS[int(rng.integers(len(BUCKETS)))]
        out.append((render(images[i], label, *hw, rng), label, hw))
    return out


def to_latent(image: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (..., 12, H/2, W/2) in [-1, 1] (pixel-unshuffle)."""
    return CODEC.encode(image * 2.0 - 1.0)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Exact inverse of to_latent (values are not clamped)."""
    return (CODEC.decode(latent) + 1.0) / 2.0


# Inpainting and editing (ladd_ds.demo.tasks builds their examples from these pieces).
# The edit instructions' words: the prompt words and the verbs. A list of its own, so that the
# text-to-image teacher's vocabulary (PROMPT_WORDS, part of its cache key) stays as it is.
EDIT_WORDS = sorted({*PROMPT_WORDS, "make", "it", "move", "to"})
MASK_KINDS = ("region", "box")  # the digit's whole quadrant, or a box over part of the digit
EDIT_KINDS = ("color", "place", "digit")


def draw_position(place: str, *, size: int, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a `size` px digit drawn uniformly inside `place`'s quadrant (as `render`)."""
    top_half, left_half = place.startswith("top"), place.endswith("left")
    rows = (0, height // 2 - size) if top_half else (height // 2, height - size)
    cols = (0, width // 2 - size) if left_half else (width // 2, width - size)
    return int(rng.integers(rows[0], rows[1] + 1)), int(rng.integers(cols[0], cols[1] + 1))


def move_position(top: int, left: int, *, place: str, new_place: str, height: int, width: int) -> tuple[int, int]:
    """(top, left) in `new_place`'s quadrant at the same offset from the quadrant's corner as
    (top, left) has in `place`'s: a move is a fixed shift by half the image per changed half."""
    rows = (height // 2) * (new_place.startswith("bottom") - place.startswith("bottom"))
    cols = (width // 2) * (new_place.endswith("right") - place.endswith("right"))
    return top + rows, left + cols


def paint(digit: np.ndarray, color: str, *, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """(3, height, width) image in [0, 1]: the 8x8 source digit at its own size, colored, with its
    top-left corner at (top, left) on a black canvas."""
    size = digit.shape[-1]
    image = torch.zeros(3, height, width)
    color_rgb = torch.tensor(COLORS[color])[:, None, None]
    image[:, top : top + size, left : left + size] = torch.from_numpy(digit).clamp(0, 1) * color_rgb
    return image


def quadrant_mask(place: str, height: int, width: int) -> torch.Tensor:
    """(1, height, width) mask, 1 over `place`'s quadrant: the whole region a digit there may occupy."""
    mask = torch.zeros(1, height, width)
    rows = slice(0, height // 2) if place.startswith("top") else slice(height // 2, height)
    cols = slice(0, width // 2) if place.endswith("left") else slice(width // 2, width)
    mask[:, rows, cols] = 1.0
    return mask


def box_mask(lit: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(1, H, W) mask, 1 over a random box that hides part of a digit whose lit pixels are `lit`
    (H, W): sides of 4 or 6 px (the digit is 8 px), corners on even pixels so that the box is
    exactly a set of cells of the latent grid (codec factor 2); some lit pixels hidden, some kept."""
    height, width = lit.shape
    rows, cols = lit.any(1).nonzero()[:, 0], lit.any(0).nonzero()[:, 0]
    for _ in range(1000):
        h, w = (int(v) for v in rng.choice([4, 6], size=2))
        # Even corners with the box overlapping the lit pixels' bounding box.
        ys = (-(-max(0, int(rows.min()) - h + 1) // 2), min(height - h, int(rows.max())) // 2)
        xs = (-(-max(0, int(cols.min()) - w + 1) // 2), min(width - w, int(cols.max())) // 2)
        if ys[0] > ys[1] or xs[0] > xs[1]:
            continue
        y, x = 2 * int(rng.integers(ys[0], ys[1] + 1)), 2 * int(rng.integers(xs[0], xs[1] + 1))
        mask = torch.zeros(1, height, width)
        mask[:, y : y + h, x : x + w] = 1.0
        if 0 < int((lit & mask[0].bool()).sum()) < int(lit.sum()):
            return mask
    raise ValueError("no box hides part of the digit (is it lit at all?)")


def edit_instruction(kind: str, target: DigitLabel) -> str:
    """The instruction that asks for `target`'s `kind` attribute: "make it green", "move it to the
    bottom left", "make it a seven"."""
    if kind == "color":
        return f"make it {target.color}"
    if kind == "place":
        return f"move it to the {target.place}"
    if kind == "digit":
        return f"make it a {DIGIT_WORDS[target.digit]}"
    raise ValueError(f"edit kind must be one of {EDIT_KINDS}, got {kind!r}")


def edit_instructions() -> list[str]:
    """Every edit instruction (18): one per color, place and digit."""
    return (
        [edit_instruction("color", DigitLabel(0, c, PLACES[0])) for c in COLORS]
        + [edit_instruction("place", DigitLabel(0, "red", p)) for p in PLACES]
        + [edit_instruction("digit", DigitLabel(d, "red", PLACES[0])) for d in range(10)]
    )
