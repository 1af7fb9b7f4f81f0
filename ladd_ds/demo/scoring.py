"""The demo's preference scorer for `ladd-ds pairs`: the digit classifier's confidence that an
image shows what its prompt asks for (a stand-in for a human-preference model)."""

from __future__ import annotations

from pathlib import Path

import torch

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.demo import digits


def digit_confidence(classifier: str, attributes: tuple[str, ...] | list[str] = ("digit",)):
    """A scorer: sum over `attributes` ("digit", "color", "place") of the classifier's
    probability of the asked-for value. `classifier`: a folder written by
    ladd_ds.demo.classifier.save_classifier (the demo caches one)."""
    from ladd_ds.demo.classifier import label_targets, load_classifier

    folder = Path(classifier)
    if not folder.is_dir():
        raise MissingInputError(f"pairs.scorer_args.classifier: {folder} is not a classifier folder")
    model, _ = load_classifier(folder)
    unknown = set(attributes) - {"digit", "color", "place"}
    if unknown:
        raise InputError(f"pairs.scorer_args.attributes: unknown {sorted(unknown)} (digit, color, place)")

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = label_targets([digits.parse_prompt(p) for p in prompts])
        logits = model.logits(images.float())
        rows = torch.arange(len(prompts))
        # A prompt that leaves the place open (target -1) is satisfied by any place: probability 1.
        return sum(logits[a].softmax(dim=1)[rows, targets[a].clamp(min=0)].where(targets[a] >= 0, 1.0) for a in attributes)

    return score
