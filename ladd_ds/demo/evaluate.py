"""Evaluation of generated demo images: Fréchet distance, prompt alignment, sampling cost.

- FD: `ladd-ds evaluate`'s Fréchet distance (ladd_ds.quality.metrics, torchmetrics' formula) in
  the feature space of the demo classifier's penultimate layer (ladd_ds.demo.classifier), against
  rendered images of *held-out* source digits (never seen by the teacher, the classifier or LADD).
- Alignment (the CLIP-score stand-in): the fraction of images whose digit, color and place the
  classifier reads as the prompt asked; per-attribute accuracies are kept too.
- Pixel cleanliness (ladd_ds.demo.pixels): hue purity of the glyph pixels and the background
  level, which see the color and texture noise that the classifier's FD and alignment miss.
- Cost: transformer evaluations per image and wall time per image (sampling + decoding, batched).
Each configuration is measured over several seeds (different initial noise, same prompts) and
reported as mean and standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ladd_ds.core.noise import derive_seed
from ladd_ds.demo import digits
from ladd_ds.demo.classifier import DigitClassifier, accuracy
from ladd_ds.demo.pixels import pixel_cleanliness
from ladd_ds.quality.features import ModuleFeatures
from ladd_ds.quality.metrics import frechet_distance
from ladd_ds.sampling import SamplingModel, generate, network_evaluations


@dataclass(frozen=True)
class EvalPrompts:
    """The prompts every configuration is sampled for: labels drawn uniformly, half per bucket."""

    labels: list[digits.DigitLabel]
    buckets: list[tuple[int, int]]

    combinations: str = "all"  # digits.PROMPT_SETS: which (digit, color, place) combinations

    @classmethod
    def draw(cls, n: int, seed: int, combinations: str = "all", open_place: float = 0.0) -> EvalPrompts:
        rng = np.random.default_rng(seed)
        labels = [digits.random_label(rng, combinations=combinations, open_place=open_place) for _ in range(n)]
        return cls(labels, [digits.BUCKETS[i % len(digits.BUCKETS)] for i in range(n)], combinations)

    def by_bucket(self) -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.buckets):
            out.setdefault(b, []).append(i)
        return out


@dataclass
class RowResult:
    name: str
    kind: str
    steps: int
    cfg: float
    nfe: int
    num_images: int
    fd: list[float] = field(default_factory=list)  # one per seed
    alignment: list[float] = field(default_factory=list)
    attributes: list[dict[str, float]] = field(default_factory=list)
    ms_per_image: list[float] = field(default_factory=list)
    hue_purity: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)  # in 1/255
    runs: int = 1  # training runs pooled into this row (`pooled`): the lists hold runs x seeds entries

    @classmethod
    def pooled(cls, rows: list[RowResult]) -> RowResult:
        """One row over several models of the same configuration (e.g. students of independent
        training runs): every run's per-seed values, so mean and std cover runs and seeds."""
        first = rows[0]
        if any((r.kind, r.steps, r.cfg, r.num_images) != (first.kind, first.steps, first.cfg, first.num_images) for r in rows):
            raise ValueError(f"pooled rows must share kind, steps, CFG and prompts; got {[r.name for r in rows]}")
        out = cls(first.name, first.kind, first.steps, first.cfg, first.nfe, first.num_images, runs=sum(r.runs for r in rows))
        for r in rows:
            out.fd += r.fd
            out.alignment += r.alignment
            out.attributes += r.attributes
            out.ms_per_image += r.ms_per_image
            out.hue_purity += r.hue_purity
            out.background += r.background
        return out

    @staticmethod
    def _stats(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def summary(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "steps": self.steps, "cfg": self.cfg, "nfe": self.nfe}
        out["num_images"] = self.num_images
        out["seeds"] = len(self.fd) // self.runs  # noise seeds per run
        out["runs"] = self.runs
        for key in ("fd", "alignment", "ms_per_image", "hue_purity", "background"):
            out[key], out[f"{key}_std"] = self._stats(getattr(self, key))
        for attr in ("digit", "color", "place"):
            out[f"acc_{attr}"] = float(np.mean([a[attr] for a in self.attributes]))
        out["finite"] = all(math.isfinite(v) for v in self.fd + self.alignment + self.ms_per_image)
        return out


class DemoEvaluator:
    def __init__(self, classifier: DigitClassifier, prompts: EvalPrompts, *, num_real: int, real_seed: int = 4321):
        self.classifier = classifier.eval()
        self.prompts = prompts
        self.features = ModuleFeatures(
            classifier, name="the demo classifier's penultimate layer", num_features=classifier.num_features
        )
        # Real reference: held-out source digits, labels drawn like the prompts (from the same
        # combinations), both buckets; one feature batch per bucket.
        per_bucket = num_real // len(digits.BUCKETS)
        self.real, real_images, real_labels = [], [], []
        for k, bucket in enumerate(digits.BUCKETS):
            real = digits.make_samples(
                per_bucket, "heldout", seed=real_seed + k, bucket=bucket, combinations=prompts.combinations
            )
            real_images.append(torch.stack([r[0] for r in real]))
            real_labels += [r[1] for r in real]
            self.real.append(self.features(real_images[-1]))
        self.num_real = per_bucket * len(digits.BUCKETS)
        # What the real renders themselves score (the tables' reference row): the classifier's
        # reading of their prompts and their pixel cleanliness. FD is 0 by definition.
        acc = _accuracy_by_bucket(self.classifier, real_images, real_labels)
        self.reference = {
            "alignment": acc["all"],
            **{f"acc_{a}": acc[a] for a in ("digit", "color", "place")},
            **_pixels_by_bucket(real_images, real_labels),
        }

    def frechet_distance(self, images: list[torch.Tensor]) -> float:
        """FD of generated image batches (one per bucket) against the held-out renders."""
        return frechet_distance(self.real, [self.features(batch) for batch in images])

    def evaluate(
        self, name: str, sm: SamplingModel, steps: int, cfg: float, seeds: list[int], *, batch_size: int = 64
    ) -> RowResult:
        nfe = network_evaluations(sm.kind, steps, cfg)
        row = RowResult(name, sm.kind, steps, cfg, nfe, len(self.prompts.labels))
        for seed in seeds:
            images, labels, seconds = [], [], 0.0
            for bucket, idx in self.prompts.by_bucket().items():
                prompts = [self.prompts.labels[i].prompt for i in idx]
                noise_seeds = [derive_seed(seed, i) for i in idx]
                batch, took = generate(
                    sm, prompts, noise_seeds, height=bucket[0], width=bucket[1], steps=steps, cfg=cfg, batch_size=batch_size
                )
                images.append(batch)
                labels += [self.prompts.labels[i] for i in idx]
                seconds += took
            acc = _accuracy_by_bucket(self.classifier, images, labels)
            pixels = _pixels_by_bucket(images, labels)
            row.hue_purity.append(pixels["hue_purity"])
            row.background.append(pixels["background"])
            row.fd.append(self.frechet_distance(images))
            row.alignment.append(acc["all"])
            row.attributes.append(acc)
            row.ms_per_image.append(1000.0 * seconds / len(labels))
        return row


def _by_bucket(measure, images: list[torch.Tensor], labels: list[digits.DigitLabel]) -> dict[str, float]:
    """`measure(batch, labels)` (a dict of means) over image batches of different sizes (one per
    bucket), weighted by their number of images."""
    total: dict[str, float] = {}
    start = 0
    for batch in images:
        for k, v in measure(batch, labels[start : start + len(batch)]).items():
            total[k] = total.get(k, 0.0) + v * len(batch)
        start += len(batch)
    return {k: v / start for k, v in total.items()}


def _accuracy_by_bucket(classifier, images: list[torch.Tensor], labels: list[digits.DigitLabel]) -> dict[str, float]:
    return _by_bucket(lambda batch, lbs: accuracy(classifier, batch, lbs), images, labels)


def _pixels_by_bucket(images: list[torch.Tensor], labels: list[digits.DigitLabel]) -> dict[str, float]:
    return _by_bucket(pixel_cleanliness, images, labels)
