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

`task` "inpaint" or "edit" trains a conditioned teacher of ladd_ds.demo.tasks instead: the
transformer widened for the task's condition channels (models/conditioning.py), its input the
noisy latent joined with the condition (inpaint: masked-image latent and latent mask; edit: the
source latent), trained on the task's examples (inpaint: the image's prompt; edit: the
instruction). Caption dropout drops the text only: guidance keeps the image condition in both
branches. `init_from` starts it from a cached text-to-image teacher's weights (its condition
channels zero), which the task's training then adapts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ladd_ds.core.files import atomic_directory
from ladd_ds.core.flow import add_noise, sample_logit_normal, shift_time, velocity_target
from ladd_ds.core.outputs import check_output
from ladd_ds.demo import digits, tasks
from ladd_ds.models.codec import PIXEL_UNSHUFFLE
from ladd_ds.models.conditioning import TASKS, join_condition
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
    task: str = "t2i"  # conditioning.TASKS: the demo's text-to-image teacher, or an inpaint/edit one
    # Kinds of training examples of an inpaint/edit task (digits.MASK_KINDS / EDIT_KINDS), drawn
    # uniformly from this list: repeat a kind to weight it. Empty: every kind of the task, equally.
    kinds: tuple[str, ...] = ()
    # Training times drawn from SD3's logit-normal density, then shifted towards noise by this
    # factor (t -> s t / (1 + (s - 1) t); 1 leaves them): more steps at the high noise levels that
    # decide where a digit goes.
    time_shift: float = 1.0
    # Share of training samples at t = 1 exactly (pure noise), the input of a 1-step student. SD3's
    # logit-normal density vanishes there, and a teacher that rarely sees it cancels the noise
    # only roughly: with the demo's pixel "latents" the residue is visible chroma speckle and
    # background haze, which LADD's student inherits (docs/demo.md, "Pixel cleanliness").
    t1_share: float = 0.0
    # Start from the cached teacher of these (text-to-image) settings, widened, instead of `seed`'s
    # random weights: a task teacher widened, or a text-to-image teacher trained further (e.g. with
    # another time density, evaluation/clean_student.py).
    init_from: PretrainSettings | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.init_from is not None and self.init_from.task != "t2i":
            raise ValueError("init_from: a teacher starts from a text-to-image teacher's settings")
        if self.task != "t2i" and self.open_place:
            raise ValueError("open_place is a text-to-image setting; the task teachers' prompts name the place")
        self.kinds = tuple(self.kinds)
        if self.kinds:
            known = {"inpaint": digits.MASK_KINDS, "edit": digits.EDIT_KINDS}.get(self.task, ())
            if not set(self.kinds) <= set(known):
                raise ValueError(f"kinds: the {self.task} task's examples are of kinds {known}, got {self.kinds}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be positive, got {self.time_shift}")
        if not 0.0 <= self.t1_share < 1.0:
            raise ValueError(f"t1_share must be in [0, 1), got {self.t1_share}")

    def key(self) -> str:
        """Identifies a cached teacher: the same settings, architecture, data and text encoders
        give the same weights (a change of any of them must not reuse an old cache entry)."""
        from ladd_ds.models.registry import PRESETS

        settings = asdict(self)
        # Teachers cached before a setting existed keep their key: the defaults are left out.
        if not self.open_place:
            del settings["open_place"]
        if self.task == "t2i":
            del settings["task"]
        if self.init_from is None:
            del settings["init_from"]
        else:
            settings["init_from"] = self.init_from.key()
        if not self.kinds:
            del settings["kinds"]
        if self.time_shift == 1.0:
            del settings["time_shift"]
        if not self.t1_share:
            del settings["t1_share"]
        identity = {
            "settings": settings,
            "architecture": PRESETS[self.preset],
            "data": digits.data_identity(),
            "text": {"clip_context": CLIP_CONTEXT, "words": tasks.task_words(self.task)},
        }
        if self.task != "t2i":
            identity["task_data"] = {"mask_kinds": digits.MASK_KINDS, "edit_kinds": digits.EDIT_KINDS}
        if self.task == "edit":
            identity["task_data"]["moves"] = tasks.MOVES
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


# The task teachers' settings (started from the t2i teacher), chosen by measurement with
# evaluation/demo_tasks.py and evaluation/edit_copy_probe.py (their docstrings hold the results).
# Editing needs more: moving a glyph to another quadrant means carrying it across tokens through
# attention, which the teacher learned only after thousands of steps, most of them on moves, with
# the training times shifted towards noise (2-core CPU measurements in docs/method.md, section 8).
TASK_SETTINGS = {
    "inpaint": {"steps": 800},
    "edit": {"steps": 6000, "kinds": ("place", "place", "place", "color", "digit"), "time_shift": 3.0},
}


def task_settings(task: str, base: PretrainSettings, steps: int | None = None, init: bool = True) -> PretrainSettings:
    """An inpaint or edit teacher's settings: `base`'s (the demo's text-to-image teacher's) with
    the task's (TASK_SETTINGS; `steps` replaces its step count), started from `base`'s teacher
    unless `init` is False."""
    if task not in TASK_SETTINGS:
        raise ValueError(f"task must be one of {list(TASK_SETTINGS)}, got {task!r}")
    own = dict(TASK_SETTINGS[task], **({} if steps is None else {"steps": steps}))
    return replace(base, task=task, init_from=base if init else None, **own)


class PromptTable:
    """Embeddings of every demo prompt and of the empty prompt, encoded once: the demo has only
    10 digits x 4 colors x 4 places prompts (or `prompts`, e.g. the 18 edit instructions)."""

    def __init__(self, text_encoder, open_place: bool = False, prompts: list[str] | None = None):
        places = digits.PLACES + [None] if open_place else digits.PLACES
        if prompts is None:
            prompts = [digits.DigitLabel(d, c, p).prompt for d in range(10) for c in digits.COLORS for p in places]
        self.prompts = [""] + prompts
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.embeds, self.pooled = text_encoder.encode(self.prompts)  # (P, L, D), (P, D')

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[p] for p in prompts])
        return self.embeds[idx], self.pooled[idx]


def save_teacher_folder(out: Path, transformer, text_encoder, info: dict, overwrite: bool = False) -> Path:
    """Write an SD3-style folder atomically (temporary name, then rename). It replaces only a
    teacher of the same settings (`info["key"]`), another teacher with `overwrite`."""
    with atomic_directory(out, "teacher", source=info.get("key"), overwrite=overwrite) as tmp:
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


def training_batch(s: PretrainSettings, step: int, source) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Step `step`'s clean latents (B, 12, h, w), condition (B, extra, h, w) or None (t2i) and
    prompts: fresh training-split samples of one bucket, buckets alternating."""
    bucket = digits.BUCKETS[step % len(digits.BUCKETS)]
    seed = s.seed * 1_000_003 + step
    if s.task == "t2i":
        batch = digits.make_samples(s.batch_size, "train", seed=seed, bucket=bucket, source=source, open_place=s.open_place)
        return digits.to_latent(torch.stack([b[0] for b in batch])), None, [b[1].prompt for b in batch]
    make_examples, make_batch = tasks.TASK_BATCHES[s.task]
    kinds = {"kinds": s.kinds} if s.kinds else {}
    return make_batch(make_examples(s.batch_size, "train", seed=seed, bucket=bucket, source=source, **kinds))


def flow_matching_loss(
    model: FlowModel,
    table: PromptTable,
    x0: torch.Tensor,
    condition: torch.Tensor | None,
    prompts: list[str],
    *,
    caption_dropout: float,
    gen: torch.Generator,
    time_shift: float = 1.0,
    t1_share: float = 0.0,
) -> torch.Tensor:
    """The teacher's rectified-flow loss on clean latents x0 (B, C, h, w): velocity MSE at times
    from SD3's logit-normal density, shifted towards noise by `time_shift` (SD3's t -> s t / (1 +
    (s - 1) t); 1 leaves it), and a share `t1_share` of the samples at t = 1 exactly. Caption
    dropout drops the text only: the image condition stays (guidance keeps it too)."""
    drop = torch.rand(len(prompts), generator=gen) < caption_dropout
    embeds, pooled = table.lookup(["" if d else p for p, d in zip(prompts, drop.tolist())])
    eps = torch.randn(x0.shape, generator=gen)
    t = sample_logit_normal((len(prompts),), generator=gen)
    t = shift_time(t, time_shift)
    if t1_share:
        t = torch.where(torch.rand(len(prompts), generator=gen) < t1_share, torch.ones_like(t), t)
    v = model(join_condition(add_noise(x0, eps, t), condition), t, embeds, pooled)
    return (v - velocity_target(x0, eps)).square().mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def pretrain_teacher(
    out: str | Path, settings: PretrainSettings | None = None, cache_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Train and save the demo teacher; returns the folder. `cache_dir`: where the teacher of
    `settings.init_from` is cached (trained first if absent), when there is one. `out` is checked
    before training (ladd_ds.core.outputs): it is replaced only when it holds a teacher of the
    same settings, another teacher only with `overwrite`."""
    from ladd_ds.models.registry import build_transformer
    from ladd_ds.models.text_encoders import build_tiny_text_encoders

    s = settings or PretrainSettings()
    out = Path(out)
    check_output(out, "teacher", source=s.key(), overwrite=overwrite)
    torch.manual_seed(s.seed)
    text = build_tiny_text_encoders(
        s.preset, seed=s.seed, drop_t5=True, max_sequence_length=0, clip_tokens=CLIP_CONTEXT, words=tasks.task_words(s.task)
    )
    table = PromptTable(text, open_place=s.open_place > 0, prompts=None if s.task == "t2i" else tasks.task_prompts(s.task))
    if s.init_from is not None:
        if cache_dir is None:
            raise ValueError("a teacher with init_from needs the cache_dir that holds (or will hold) its initial teacher")
        base, _ = cached_teacher(cache_dir, s.init_from)
        transformer = build_transformer(str(base), task=s.task)  # the t2i weights, condition channels zero
    else:
        transformer = build_transformer(s.preset, seed=s.seed, task=s.task)
    model = FlowModel(transformer).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    source = digits.load_source_digits("train")
    gen = torch.Generator().manual_seed(s.seed)
    losses = []
    start = time.time()
    bar = tqdm(range(s.steps), desc="pretrain teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        x0, condition, prompts = training_batch(s, step, source)  # (B, 12, H/2, W/2), (B, extra, ...) or None
        loss = flow_matching_loss(
            model,
            table,
            x0,
            condition,
            prompts,
            caption_dropout=s.caption_dropout,
            gen=gen,
            time_shift=s.time_shift,
            t1_share=s.t1_share,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(s.ema_decay, (1 + step) / (10 + step)))  # short warm-up of the EMA
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
        "task": s.task,
        "settings": asdict(s),
        "key": s.key(),
        "seconds": time.time() - start,
        "loss_per_50_steps": curve,
    }
    return save_teacher_folder(out, ema.transformer, text, info, overwrite=overwrite)


def cached_teacher(cache_dir: str | Path, settings: PretrainSettings) -> tuple[Path, bool]:
    """The teacher for `settings` from the cache, trained first if absent. Returns (folder, was_cached)."""
    kind = "" if settings.task == "t2i" else f"{settings.task}-"
    folder = Path(cache_dir) / f"demo-{kind}teacher-{settings.key()}"
    if (folder / INFO_FILE).is_file():
        return folder, True
    return pretrain_teacher(folder, settings, cache_dir), False
