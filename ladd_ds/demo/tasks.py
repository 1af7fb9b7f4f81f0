"""The digits demo's inpainting and editing tasks: their examples, the teachers' training batches,
and their metrics (issue 17; the text-to-image demo is ladd_ds.demo.digits).

Inpainting: a rendered digit image, a pixel mask (1 = fill in) and the image's label, whose prompt
names what should appear. Masks of two kinds (digits.MASK_KINDS): the digit's whole quadrant
("region": the digit must be drawn from the prompt alone) or a box over part of the digit ("box").

Editing: (source image, instruction, target image) with one attribute changed (digits.EDIT_KINDS):
"make it green" (the same glyph at the same position in the new color), "move it to the bottom
left" (the same glyph, shifted into the new quadrant at the same offset from its corner), "make
it a seven" (a glyph of the new digit from the same split, at the source's color and position).

Images here are in [-1, 1] (the pixel range of the codec and of conditioning.inpaint_condition).
Every example is reproducible from (split, seed); train and held-out splits use disjoint source
digits (digits.load_source_digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ladd_ds.demo import digits
from ladd_ds.models.conditioning import inpaint_condition, paste_back

# How a place edit's target is drawn, part of the edit teachers' cache key: "offset kept" (the
# glyph shifted by half the image per changed half, digits.move_position). Until Dec 2026 the new
# position in the quadrant was drawn afresh, which made a move in the wide bucket a guess.
MOVES = "offset kept"


@dataclass(frozen=True)
class InpaintExample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor  # (1, H, W), 1 = fill in
    label: digits.DigitLabel  # always with a place
    kind: str  # digits.MASK_KINDS

    @property
    def prompt(self) -> str:
        return self.label.prompt


@dataclass(frozen=True)
class EditExample:
    source: torch.Tensor  # (3, H, W) in [-1, 1]
    instruction: str
    target: torch.Tensor  # (3, H, W) in [-1, 1]
    source_label: digits.DigitLabel
    target_label: digits.DigitLabel
    kind: str  # digits.EDIT_KINDS


def _check_kinds(kinds: tuple[str, ...], known: tuple[str, ...], what: str) -> None:
    if not kinds or any(k not in known for k in kinds):
        raise ValueError(f"{what} kinds must be a non-empty subset of {known}, got {kinds}")


def _draw(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, bucket):
    """One source digit, its label (digit, color, place: all combinations) and the bucket."""
    i = int(rng.integers(len(images)))
    label = digits.random_label(rng, int(targets[i]))
    hw = bucket or digits.BUCKETS[int(rng.integers(len(digits.BUCKETS)))]
    return images[i], label, hw


def inpaint_examples(
    n: int,
    split: str,
    seed: int,
    bucket: tuple[int, int] | None = None,
    source=None,
    kinds: tuple[str, ...] = digits.MASK_KINDS,
) -> list[InpaintExample]:
    """n inpainting examples, reproducible from (split, seed); mask kinds drawn uniformly from
    `kinds`, the bucket of each random unless `bucket` is given. `source`:
    digits.load_source_digits(split), to skip reloading."""
    _check_kinds(kinds, digits.MASK_KINDS, "mask")
    images, targets = source if source is not None else digits.load_source_digits(split)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        glyph, label, (h, w) = _draw(rng, images, targets, bucket)
        top, left = digits.draw_position(label.place, size=glyph.shape[-1], height=h, width=w, rng=rng)
        kind = kinds[int(rng.integers(len(kinds)))]
        image = digits.paint(glyph, label.color, top=top, left=left, height=h, width=w)
        if kind == "region":
            mask = digits.quadrant_mask(label.place, h, w)
        else:
            mask = digits.box_mask(image.amax(0) > 0, rng)
        image = image * 2.0 - 1.0
        out.append(InpaintExample(image, mask, label, kind))
    return out


def edit_examples(
    n: int,
    split: str,
    seed: int,
    bucket: tuple[int, int] | None = None,
    source=None,
    kinds: tuple[str, ...] = digits.EDIT_KINDS,
) -> list[EditExample]:
    """n editing examples, reproducible from (split, seed); edit kinds drawn uniformly from
    `kinds`, the new attribute uniformly among the values other than the source's."""
    _check_kinds(kinds, digits.EDIT_KINDS, "edit")
    images, targets = source if source is not None else digits.load_source_digits(split)
    by_digit = [np.flatnonzero(targets == d) for d in range(10)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        glyph, label, (h, w) = _draw(rng, images, targets, bucket)
        top, left = digits.draw_position(label.place, size=glyph.shape[-1], height=h, width=w, rng=rng)
        kind = kinds[int(rng.integers(len(kinds)))]
        new_glyph, new_top, new_left = glyph, top, left
        if kind == "color":
            colors = [c for c in digits.COLORS if c != label.color]
            new = digits.DigitLabel(label.digit, colors[int(rng.integers(len(colors)))], label.place)
        elif kind == "place":
            places = [p for p in digits.PLACES if p != label.place]
            new = digits.DigitLabel(label.digit, label.color, places[int(rng.integers(len(places)))])
            new_top, new_left = digits.move_position(top, left, place=label.place, new_place=new.place, height=h, width=w)
        else:
            others = [d for d in range(10) if d != label.digit]
            new = digits.DigitLabel(others[int(rng.integers(len(others)))], label.color, label.place)
            new_glyph = images[int(rng.choice(by_digit[new.digit]))]
        src = digits.paint(glyph, label.color, top=top, left=left, height=h, width=w) * 2.0 - 1.0
        tgt = digits.paint(new_glyph, new.color, top=new_top, left=new_left, height=h, width=w) * 2.0 - 1.0
        out.append(EditExample(src, digits.edit_instruction(kind, new), tgt, label, new, kind))
    return out


def inpaint_batch(examples: list[InpaintExample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A teacher's training batch (one bucket): the clean latents (B, 12, h, w), the condition
    (B, 13, h, w) = masked-image latent and latent mask (conditioning.inpaint_condition), the prompts."""
    images = torch.stack([e.image for e in examples])  # (B, 3, H, W)
    masks = torch.stack([e.mask for e in examples])  # (B, 1, H, W)
    masked, mask = inpaint_condition(digits.CODEC, images, masks)
    return digits.CODEC.encode(images), torch.cat([masked, mask], dim=1), [e.prompt for e in examples]


def edit_batch(examples: list[EditExample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A teacher's training batch (one bucket): the target latents (B, 12, h, w), the condition
    (B, 12, h, w) = the source latent, the instructions."""
    targets = torch.stack([e.target for e in examples])
    sources = torch.stack([e.source for e in examples])
    return digits.CODEC.encode(targets), digits.CODEC.encode(sources), [e.instruction for e in examples]


TASK_BATCHES = {"inpaint": (inpaint_examples, inpaint_batch), "edit": (edit_examples, edit_batch)}


def task_words(task: str) -> list[str]:
    """The whole-word vocabulary of a task teacher's tokenizer."""
    return digits.EDIT_WORDS if task == "edit" else digits.PROMPT_WORDS


def task_prompts(task: str) -> list[str]:
    """Every prompt a task teacher is trained on (without the empty one)."""
    if task == "edit":
        return digits.edit_instructions()
    return [digits.DigitLabel(d, c, p).prompt for d in range(10) for c in digits.COLORS for p in digits.PLACES]


# Metrics: pure functions of images in [-1, 1] and the demo classifier (classifier.predict).


def _read(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    from ladd_ds.demo.classifier import predict

    return predict(classifier, ((images.float() + 1.0) / 2.0).clamp(0, 1))


def inpaint_metrics(
    classifier, outputs: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, labels: list[digits.DigitLabel]
) -> dict[str, float]:
    """Inpainting quality of raw model outputs (B, 3, H, W) for source images (B, 3, H, W) and pixel
    masks (B, 1, H, W), all in [-1, 1]:
    - kept_error: mean absolute pixel error (in [-1, 1] units) between output and source outside
      the mask (what the model should have kept);
    - alignment: the share of pasted-back results (conditioning.paste_back) whose digit, color and
      place the classifier reads as the label says; `digit`, `color`, `place` per attribute."""
    from ladd_ds.demo.classifier import label_targets

    outputs, images, masks = outputs.float(), images.float(), masks.float()
    keep = (1.0 - masks).expand_as(images)
    kept_error = ((outputs - images).abs() * keep).sum() / keep.sum().clamp_min(1.0)
    pred, target = _read(classifier, paste_back(outputs, images, masks)), label_targets(labels)
    hits = {k: pred[k] == target[k] for k in pred}
    out = {"kept_error": kept_error.item()}
    out["alignment"] = (hits["digit"] & hits["color"] & hits["place"]).float().mean().item()
    out.update({k: v.float().mean().item() for k, v in hits.items()})
    return out


def edit_metrics(
    classifier,
    outputs: torch.Tensor,
    sources: torch.Tensor,
    source_labels: list[digits.DigitLabel],
    target_labels: list[digits.DigitLabel],
    kinds: list[str],
) -> dict[str, float]:
    """Editing quality of outputs (B, 3, H, W) for source images (B, 3, H, W), all in [-1, 1]:
    - success: the share whose requested attribute (the edit's kind) the classifier reads as the
      target label's;
    - preservation: the share whose other two attributes the classifier reads as it reads them on
      the source image: unchanged by the edit. Compared with the reading of the source, not with its
      label, so that the classifier's own errors (it misreads some held-out digits, the same way on
      the source and on a faithful copy of it) do not cap the measure below 1;
    - preservation_vs_label: the same against the source's label (capped by those errors);
    - success/<kind>, preservation/<kind> per edit kind present."""
    from ladd_ds.demo.classifier import label_targets

    _check_kinds(tuple(set(kinds)), digits.EDIT_KINDS, "edit")
    pred, seen = _read(classifier, outputs), _read(classifier, sources)
    src, tgt = label_targets(source_labels), label_targets(target_labels)
    kind_of = np.array(kinds)
    success = torch.zeros(len(kinds), dtype=torch.bool)
    kept = torch.ones(len(kinds), dtype=torch.bool)
    kept_label = torch.ones(len(kinds), dtype=torch.bool)
    for kind in digits.EDIT_KINDS:  # each kind changes the attribute of its name
        rows = torch.from_numpy(kind_of == kind)
        success |= rows & (pred[kind] == tgt[kind])
        kept &= rows | (pred[kind] == seen[kind])  # an attribute the edits of other kinds must keep
        kept_label &= rows | (pred[kind] == src[kind])
    out = {"success": success.float().mean().item(), "preservation": kept.float().mean().item()}
    out["preservation_vs_label"] = kept_label.float().mean().item()
    for kind in digits.EDIT_KINDS:
        rows = torch.from_numpy(kind_of == kind)
        if rows.any():
            out[f"success/{kind}"] = success[rows].float().mean().item()
            out[f"preservation/{kind}"] = kept[rows].float().mean().item()
    return out
