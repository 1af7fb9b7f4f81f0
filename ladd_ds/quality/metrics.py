"""Distribution and alignment metrics through torchmetrics, over ranks.

- Fréchet distance and KID: torchmetrics' FrechetInceptionDistance and KernelInceptionDistance
  fed with features already computed (`Given`: the feature network ran once per image, for both
  metrics and for every bucket an image counts in). Each rank computes the features of its share
  and `ranks.gather_rows` collects them in sample order on every rank (KID's own state reduction is this
  concatenation), so every rank computes the same numbers, equal to one process's.
- CLIP score: torchmetrics' CLIPScore on a local CLIP folder; its states (score sum, count) are
  summed over ranks by torchmetrics at `compute`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ladd_ds.core.errors import InputError, MissingInputError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default; smaller sets use all their samples per subset


class Given(nn.Module):
    """The identity on (N, D) features: the torchmetrics metrics' feature extractor when the
    features are computed outside them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor | list[torch.Tensor], fake: torch.Tensor | list[torch.Tensor]) -> float:
    """FD between two feature sets (N, D) and (M, D), N, M >= 2: torchmetrics' FID formula, its
    sums in float64. A list of tensors is one set added chunk by chunk (the demo adds a bucket at
    a time, as it always has: the same sums in the same order)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _chunks(real), _chunks(fake)
    fid = FrechetInceptionDistance(feature=Given(real[0].shape[1]), sync_on_compute=False)
    for chunk in real:
        fid.update(chunk.float(), real=True)
    for chunk in fake:
        fid.update(chunk.float(), real=False)
    return float(fid.compute())


def _chunks(features: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(features) if isinstance(features, (list, tuple)) else [features]


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets; subsets of min(1000, N, M) samples
    drawn with a fixed seed, so that every rank and every re-run draws the same ones."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    kid = KernelInceptionDistance(feature=Given(real.shape[1]), subsets=KID_SUBSETS, subset_size=size, sync_on_compute=False)
    kid.update(real.float(), real=True)
    kid.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


class ClipScorer:
    """CLIP score (torchmetrics' CLIPScore: 100 x cosine of image and prompt embeddings, at most
    0) with a local CLIP folder (CLIPModel + CLIPProcessor, save_pretrained)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MissingInputError(f"--clip {folder}: no config.json; pass a CLIP folder (CLIPModel.save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise InputError(f"--clip {folder}: not a CLIP model with its processor ({str(e).splitlines()[0][:200]})") from None
        self.device = device
        self.name = f"CLIP score ({folder.name})"

    def metric(self):
        """A fresh CLIPScore on this scorer's model (states summed over ranks at compute)."""
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=lambda: (self.model, self.processor)).to(self.device)

    def update(self, metric, images: torch.Tensor, prompts: list[str]) -> None:
        """Add images (N, 3, H, W) in [0, 1] of `prompts` to a CLIPScore (on the model's device:
        torchmetrics moves the model to where the images are)."""
        pixels = (images.clamp(0, 1) * 255).round().to(self.device, torch.uint8)
        with torch.no_grad():
            metric.update(list(pixels), prompts)


def check_metrics(names: list[str], *, features: str | None, clip: str | None, reference: bool) -> list[str]:
    """--metrics checked against what they need: fd/kid a feature network and a reference, clip a
    CLIP folder; cost needs nothing."""
    known = ("fd", "kid", "clip", "cost")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--metrics: unknown {unknown}; choose from {', '.join(known)}")
    if {"fd", "kid"} & set(names):
        if features is None:
            raise InputError("--metrics fd/kid need --features (an Inception-v3 weights file or an image-encoder folder)")
        if not reference:
            raise InputError("--metrics fd/kid need a reference: --reference DIR (images) or --reference-model/--teacher")
    if "clip" in names and clip is None:
        raise InputError("--metrics clip needs --clip FOLDER (a CLIP model saved with save_pretrained)")
    return names
