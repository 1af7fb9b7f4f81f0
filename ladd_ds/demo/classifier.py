"""The demo's judge: a small CNN that reads digit, color and place from a demo image.

Trained on rendered samples of the *training* split of source digits (ladd_ds.demo.digits), checked
on samples of the held-out split. Two uses:
- prompt alignment (the CLIP-score stand-in): does a generated image show the digit, color and
  place its prompt asked for;
- Fréchet distance: its penultimate activations (`num_features` wide) are the feature space,
  plugged into torchmetrics' FrechetInceptionDistance as a custom feature extractor.

The convolutional trunk ends in a 2x2 adaptive pooling, so both aspect-ratio buckets map to the
same feature width and the place (which half, horizontally and vertically) stays readable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ladd_ds.core.files import atomic_directory
from ladd_ds.demo import digits

WEIGHTS, INFO = "classifier.safetensors", "classifier.json"


class DigitClassifier(nn.Module):
    num_features = 64  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        # What the digit is does not depend on where it is: global max pooling. Where it is
        # (which half, horizontally and vertically) needs a coarse map: 2x2 average pooling.
        self.where = nn.Sequential(nn.Conv2d(4 * w, 8, 1), nn.AdaptiveAvgPool2d(2))
        self.embed = nn.Linear(4 * w + 32, self.num_features)
        self.digit = nn.Linear(self.num_features, 10)
        self.color = nn.Linear(self.num_features, len(digits.COLORS))
        self.place = nn.Linear(self.num_features, len(digits.PLACES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_features)."""
        h = self.trunk(images * 2.0 - 1.0)  # (B, 4w, H/4, W/4)
        what = h.amax(dim=(2, 3))  # (B, 4w)
        where = self.where(h).flatten(1)  # (B, 32)
        return F.relu(self.embed(torch.cat([what, where], dim=1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {"digit": self.digit(f), "color": self.color(f), "place": self.place(f)}


def label_targets(labels: list[digits.DigitLabel]) -> dict[str, torch.Tensor]:
    """Class indices per attribute; the place of a label without one is -1 (any place is right)."""
    colors, places = list(digits.COLORS), digits.PLACES
    return {
        "digit": torch.tensor([lb.digit for lb in labels]),
        "color": torch.tensor([colors.index(lb.color) for lb in labels]),
        "place": torch.tensor([-1 if lb.place is None else places.index(lb.place) for lb in labels]),
    }


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"digit": [], "color": [], "place": []}
    for i in range(0, len(images), batch_size):
        for k, v in model.logits(images[i : i + batch_size]).items():
            out[k].append(v.argmax(1))
    return {k: torch.cat(v) for k, v in out.items()}


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: list[digits.DigitLabel]) -> dict[str, float]:
    """Per attribute, and `all`: digit, color and place all right. A prompt without a place
    (target -1) counts as right on place; `place` is the accuracy over the prompts that name one
    (1.0 when none does)."""
    pred, target = predict(model, images), label_targets(labels)
    hits = {k: pred[k] == target[k] for k in pred}
    open_place = target["place"] < 0
    hits["place"] = hits["place"] | open_place
    acc = {k: v.float().mean().item() for k, v in hits.items()}
    named = ~open_place
    acc["place"] = hits["place"][named].float().mean().item() if named.any() else 1.0
    acc["all"] = (hits["digit"] & hits["color"] & hits["place"]).float().mean().item()
    return acc


def held_out_set(n: int, seed: int, bucket: tuple[int, int]) -> tuple[torch.Tensor, list[digits.DigitLabel]]:
    samples = digits.make_samples(n, "heldout", seed=seed, bucket=bucket)
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def train_classifier(
    steps: int = 1500, *, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
) -> tuple[DigitClassifier, dict]:
    """Train on fresh training-split samples each step; report held-out accuracy per bucket."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    source = digits.load_source_digits("train")
    start = time.time()
    for step in tqdm(range(steps), desc="train classifier", unit="step", dynamic_ncols=True):
        bucket = digits.BUCKETS[step % len(digits.BUCKETS)]
        batch = digits.make_samples(batch_size, "train", seed=10_000_019 * (seed + 1) + step, bucket=bucket, source=source)
        logits = model.logits(torch.stack([b[0] for b in batch]))
        targets = label_targets([b[1] for b in batch])
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    info = {"steps": steps, "batch_size": batch_size, "seed": seed, "seconds": time.time() - start, "heldout": {}}
    for bucket in digits.BUCKETS:
        images, labels = held_out_set(1000, seed=123, bucket=bucket)
        info["heldout"][f"{bucket[0]}x{bucket[1]}"] = accuracy(model, images, labels)
    return model, info


def save_classifier(model: DigitClassifier, info: dict, folder: Path) -> None:
    with atomic_directory(folder, "classifier") as tmp:
        save_file(model.state_dict(), tmp / WEIGHTS)
        (tmp / INFO).write_text(json.dumps(info, indent=2))


def load_classifier(folder: Path) -> tuple[DigitClassifier, dict]:
    model = DigitClassifier()
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval(), json.loads((folder / INFO).read_text())


def classifier_folder(cache_dir: str | Path, *, steps: int = 1500, seed: int = 0) -> Path:
    return Path(cache_dir) / f"demo-classifier-s{steps}-seed{seed}"


def cached_classifier(cache_dir: str | Path, *, steps: int = 1500, seed: int = 0) -> tuple[DigitClassifier, dict]:
    """The classifier from the cache, trained (and cached) first if absent."""
    folder = classifier_folder(cache_dir, steps=steps, seed=seed)
    if (folder / INFO).is_file():
        return load_classifier(folder)
    model, info = train_classifier(steps=steps, seed=seed)
    save_classifier(model, info, folder)
    return model, info
