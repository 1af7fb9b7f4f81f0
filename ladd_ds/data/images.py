"""Reading images for the latent grid: the bucket of an image and its center crop to a size.

Shared by `ladd-ds encode` and `synth` (real images and conditions of training examples) and by
`ladd-ds sample --image/--mask` (the condition of an inpainting or editing sample), so that a
condition is cut from its image the same way wherever it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ladd_ds.data.prompts import parse_bucket

EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees: width and height swap
UNREADABLE = "(unreadable)"  # the bucket of an image that is skipped before it is read: see checked_bucket


def nearest_bucket(width: int, height: int, buckets: list[str]) -> str:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(parse_bucket(b)[1] / parse_bucket(b)[0]) - ratio))


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown, after its EXIF orientation."""
    w, h = im.size
    return (h, w) if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def image_bucket(path, buckets: list[str]) -> str:
    """The bucket of nearest aspect ratio to the image as shown, or UNREADABLE when its header
    does not decode (the generating commands skip such an image, recording why)."""
    return checked_bucket(path, buckets)[0]


@dataclass(frozen=True)
class ImageLimits:
    """The smallest shorter side and the largest long/short side ratio of an image that is cut into
    a bucket (data.min_image_side, data.max_aspect_ratio); `*_note`: where a default came from,
    for the skip reasons."""

    min_side: int
    max_aspect: float
    min_side_note: str = ""
    max_aspect_note: str = ""

    @classmethod
    def for_buckets(cls, buckets: list[str], *, min_side: int | None = None, max_aspect: float | None = None) -> ImageLimits:
        """The configured limits, each null one derived from the buckets: half the smallest bucket
        side, twice the most elongated bucket's ratio (the comments on DataConfig say why)."""
        sides = [parse_bucket(b) for b in buckets]
        min_note = aspect_note = ""
        if min_side is None:
            min_side = max(1, min(min(hw) for hw in sides) // 2)
            min_note = " (the default: half the smallest bucket side)"
        if max_aspect is None:
            max_aspect = 2.0 * max(max(hw) / min(hw) for hw in sides)
            aspect_note = " (the default: twice the most elongated bucket's ratio)"
        return cls(min_side, float(max_aspect), min_note, aspect_note)

    def violation(self, width: int, height: int) -> str:
        """Why an image of this size is not cut into a bucket, or "" when it may be."""
        if min(width, height) < self.min_side:
            return f"image is {width}x{height} pixels, smaller than data.min_image_side = {self.min_side}{self.min_side_note}"
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect:
            return (
                f"image is {width}x{height} pixels, aspect ratio {ratio:.4g} beyond data.max_aspect_ratio = "
                f"{self.max_aspect:g}{self.max_aspect_note}"
            )
        return ""


def checked_bucket(path, buckets: list[str], limits: ImageLimits | None = None) -> tuple[str, str]:
    """(the bucket of nearest aspect ratio to the image as shown, "") from its header alone, or
    (UNREADABLE, why) when the header does not decode or the size is outside `limits`: the
    generating commands skip such an image, recording why."""
    try:
        with Image.open(path) as im:
            width, height = displayed_size(im)
    except (OSError, ValueError, Image.DecompressionBombError):
        return UNREADABLE, "cannot identify the image file (not a decodable image)"
    why = limits.violation(width, height) if limits is not None else ""
    return (UNREADABLE, why) if why else (nearest_bucket(width, height, buckets), "")


def _cover_crop(im: Image.Image, height: int, width: int, resample) -> Image.Image:
    """Resize to cover (height, width), then center-crop to it."""
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, resample)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def load_cropped(path: str, height: int, width: int) -> torch.Tensor:
    """Apply the EXIF orientation, resize to cover (height, width), center-crop; (3, H, W) in [-1, 1]."""
    with Image.open(path) as im:
        im = _cover_crop(ImageOps.exif_transpose(im).convert("RGB"), height, width, Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)  # (3, H, W)


def load_mask(path: str, height: int, width: int) -> torch.Tensor:
    """An inpainting mask image (white = fill in) cut like load_cropped cuts its image, resized
    with nearest neighbour so that it stays binary: (1, H, W), 1 = fill in, 0 = keep."""
    with Image.open(path) as im:
        im = _cover_crop(ImageOps.exif_transpose(im).convert("L"), height, width, Image.NEAREST)
        m = torch.from_numpy((np.asarray(im) >= 128).astype(np.float32))
    return m[None]  # (1, H, W)
