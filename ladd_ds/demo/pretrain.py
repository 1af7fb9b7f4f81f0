"""`ladd-ds pretrain-teacher`: a small real teacher for the CPU demo (a demo helper, not part of
the LADD method).

Trains the `demo` preset (an SD3Transformer2DModel) with rectified flow on the colored-digit data
of ladd_ds.demo.digits: t from SD3's logit-normal(0, 1), velocity target `eps - x0`, and caption
dropout (the prompt replaced by the empty prompt's embeddings with probability
`caption_dropout`) so that classifier-free guidance works. Every step draws fresh samples (new
digit, color, place, size and position) from the training split, one bucket per batch, buckets
alternating. The saved weights are an EMA of the trained ones.

The output is a diffusers-style SD3 folder that every other command can use as a model
(`model.teacher`, `text.encoders`, `ladd-ds sample --model`):
  transformer/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ (tiny CLIPs, no T5)
  ladd_model.json (latent codec and sampling shift for `ladd-ds sample`; the settings and the
  loss curve)
It is written under a temporary name and renamed when complete, so a cached teacher is whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ladd_ds.core.files import atomic_directory
from ladd_ds.core.flow import add_noise, sample_logit_normal, velocity_target
from ladd_ds.demo import digits
from ladd_ds.models.codec import PIXEL_UNSHUFFLE
from ladd_ds.models.flow_model import FlowModel

# The demo's CLIPs know the demo's 21 prompt words as whole tokens (any other text still
# tokenizes byte by byte), so a prompt is 9 tokens with start and end, and their context is 12
# tokens instead of SD3's 77. In SD3's joint blocks text tokens cost as much as image tokens, so
# this is a large share of every transformer call on a 2-core CPU.
CLIP_CONTEXT = 12
INFO_FILE = "ladd_model.json"  # read by ladd_ds.sampling: the latent codec and schedule shift


@dataclass
class PretrainSettings:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay after the warm-up, down to this fraction of lr
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    seed: int = 0
    preset: str = "demo"
    shift: float = 1.0  # sampling schedule shift recorded with the model
    # Share of training prompts that leave the place open ("a red seven"): their images have the
    # digit in any quadrant, a distribution with several modes per prompt (digits.random_label).
    open_place: float = 0.0

    def key(self) -> str:
        """Identifies a cached teacher: the same settings, architecture, data and text encoders
        give the same weights (a change of any of them must not reuse an old cache entry)."""
        from ladd_ds.models.registry import PRESETS

        settings = asdict(self)
        if not self.open_place:
            del settings["open_place"]  # teachers cached before the setting existed keep their key
        identity = {
            "settings": settings,
            "architecture": PRESETS[self.preset],
            "data": digits.data_identity(),
            "text": {"clip_context": CLIP_CONTEXT, "words": digits.PROMPT_WORDS},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


class PromptTable:
    """Embeddings of every demo prompt and of the empty prompt, encoded once: the demo has only
    10 digits x 4 colors x 4 places prompts."""

    def __init__(self, text_encoder, open_place: bool = False):
        places = digits.PLACES + [None] if open_place else digits.PLACES
        self.prompts = [""] + [digits.DigitLabel(d, c, p).prompt for d in range(10) for c in digits.COLORS for p in places]
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.embeds, self.pooled = text_encoder.encode(self.prompts)  # (P, L, D), (P, D')

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[p] for p in prompts])
        return self.embeds[idx], self.pooled[idx]


def save_teacher_folder(out: Path, transformer, text_encoder, info: dict) -> Path:
    """Write an SD3-style folder atomically (temporary name, then rename)."""
    with atomic_directory(out) as tmp:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        pipe = text_encoder.pipe
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            getattr(pipe, name).save_pretrained(tmp / name)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    return out


def lr_factor(step: int, s: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` at the last step."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_teacher(out: str | Path, settings: PretrainSettings | None = None) -> Path:
    """Train and save the demo teacher; returns the folder."""
    from ladd_ds.models.registry import build_transformer
    from ladd_ds.models.text_encoders import build_tiny_text_encoders

    s = settings or PretrainSettings()
    out = Path(out)
    torch.manual_seed(s.seed)
    text = build_tiny_text_encoders(
        s.preset, seed=s.seed, drop_t5=True, max_sequence_length=0, clip_tokens=CLIP_CONTEXT, words=digits.PROMPT_WORDS
    )
    table = PromptTable(text, open_place=s.open_place > 0)
    model = FlowModel(build_transformer(s.preset, seed=s.seed)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    source = digits.load_source_digits("train")
    gen = torch.Generator().manual_seed(s.seed)
    losses = []
    start = time.time()
    bar = tqdm(range(s.steps), desc="pretrain teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        bucket = digits.BUCKETS[step % len(digits.BUCKETS)]
        batch = digits.make_samples(
            s.batch_size, "train", seed=s.seed * 1_000_003 + step, bucket=bucket, source=source, open_place=s.open_place
        )
        x0 = digits.to_latent(torch.stack([b[0] for b in batch]))  # (B, 12, H/2, W/2)
        prompts = [b[1].prompt for b in batch]
        drop = torch.rand(len(prompts), generator=gen) < s.caption_dropout
        embeds, pooled = table.lookup(["" if d else p for p, d in zip(prompts, drop.tolist())])
        eps = torch.randn(x0.shape, generator=gen)
        t = sample_logit_normal((len(prompts),), generator=gen)  # SD3's training density
        v = model(add_noise(x0, eps, t), t, embeds, pooled)
        loss = (v - velocity_target(x0, eps)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(s.ema_decay, (1 + step) / (10 + step))  # short warm-up of the EMA
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    curve = [float(np.mean(losses[i : i + 50])) for i in range(0, len(losses), 50)]
    info = {
        "codec": PIXEL_UNSHUFFLE,
        "shift": s.shift,
        "max_sequence_length": 0,  # no T5: prompt_embeds are the CLIP tokens only
        "default_size": list(digits.BUCKETS[0]),  # [height, width] for `ladd-ds sample` without --size
        "settings": asdict(s),
        "key": s.key(),
        "seconds": time.time() - start,
        "loss_per_50_steps": curve,
    }
    return save_teacher_folder(out, ema.transformer, text, info)


def cached_teacher(cache_dir: str | Path, settings: PretrainSettings) -> tuple[Path, bool]:
    """The teacher for `settings` from the cache, trained first if absent. Returns (folder, was_cached)."""
    folder = Path(cache_dir) / f"demo-teacher-{settings.key()}"
    if (folder / INFO_FILE).is_file():
        return folder, True
    return pretrain_teacher(folder, settings), False
