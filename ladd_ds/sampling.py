"""Sampling: the LADD student's few-step sampler and the teacher's Euler sampler with CFG.

`ladd-ds sample --model M --prompts FILE --steps N [--cfg S] --seed K --out grid.png` loads M as
- a `ladd-ds export` folder (ladd_export.json): a LADD student, sampled as in docs/method.md, section 4;
- (`ladd-ds sample` only) a `ladd-ds train` run directory: its latest checkpoint, exported to a
  temporary folder first by the CLI;
- a diffusers SD3 folder (transformer/, text encoders, vae/ or a ladd_model.json naming the
  latent codec): a teacher, sampled with diffusers' flow-matching Euler scheduler and CFG.
and writes the PNG grid (one row per prompt) and an .npz next to it with the images (uint8,
N x H x W x C), the prompt index and seed of each, and the prompts.

Inpainting and editing models (models/conditioning.py) sample from a condition as well: `--image`
(and `--mask` for inpainting, white = fill in), cut to the sample size; an inpainting sample is
also written pasted back into the kept part of the image (OUT_pasted.png/.npz).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ladd_ds.core.errors import InputError, OutputExistsError
from ladd_ds.core.flow import add_noise, x0_from_velocity
from ladd_ds.core.noise import derive_seed
from ladd_ds.core.outputs import absolute
from ladd_ds.core.precision import dtype_of
from ladd_ds.data.images import load_cropped, load_mask
from ladd_ds.data.prompts import numbered_lines, parse_bucket, prompt_record
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import (
    ConditionedTransformer,
    batch_condition,
    inpaint_condition,
    join_condition,
    latent_channels,
    model_task,
    paste_back,
)
from ladd_ds.models.flow_model import FlowModel
from ladd_ds.models.lora import load_lora
from ladd_ds.models.scheduler import DEFAULT_SHIFT, MODEL_INFO, folder_sampler_settings
from ladd_ds.models.text_encoders import text_encoders_from_spec

EXPORT_INFO = "ladd_export.json"


@dataclass(frozen=True)
class TrainedTimes:
    """The input times a LADD student was trained on: ladd.student_timesteps, drawn with
    ladd.student_probs (and ladd.warmup_probs in the warm-up's steps), as its export records them
    (ladd/export.py). A time of probability 0 in every phase was never trained. `probs` None: an
    export written before the probabilities were recorded, whose every time counts as trained."""

    timesteps: tuple[float, ...]
    probs: tuple[float, ...] | None = None
    warmup_probs: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, ladd) -> TrainedTimes:
        """From a run's `ladd` config section (config.LADDConfig)."""
        warmup = ladd.warmup_probs if ladd.warmup_steps > 0 else None  # without warm-up steps they never draw
        return cls(tuple(ladd.student_timesteps), tuple(ladd.student_probs), _tuple(warmup))

    @classmethod
    def from_record(cls, sampling: dict) -> TrainedTimes | None:
        """From an export's `sampling` record; None when it has no timesteps (older exports)."""
        if sampling.get("student_timesteps") is None:
            return None
        return cls(
            tuple(sampling["student_timesteps"]), _tuple(sampling.get("student_probs")), _tuple(sampling.get("warmup_probs"))
        )

    def record(self) -> dict:
        """What an export records (`sampling` of ladd_export.json)."""
        out = {"student_timesteps": list(self.timesteps), "student_probs": _list(self.probs)}
        if self.warmup_probs is not None:  # recorded only for runs with a warm-up
            out["warmup_probs"] = list(self.warmup_probs)
        return out

    def drawn(self) -> list[float]:
        """The timesteps training drew with a probability above 0."""
        if self.probs is None:
            return list(self.timesteps)
        phases = [self.probs] if self.warmup_probs is None else [self.probs, self.warmup_probs]
        return [t for i, t in enumerate(self.timesteps) if any(p[i] > 0 for p in phases)]

    def describe(self) -> str:
        text = f"t in {list(self.timesteps)}"
        if self.probs is not None:
            text += f" with probabilities {list(self.probs)} (ladd.student_probs)"
        if self.warmup_probs is not None:
            text += f", {list(self.warmup_probs)} in the warm-up (ladd.warmup_probs)"
        return text


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


def _list(values) -> list | None:
    return None if values is None else list(values)


@dataclass
class SamplingModel:
    transformer: torch.nn.Module  # SD3Transformer2DModel
    text: object  # ladd_ds.models.text_encoders.SD3TextEncoder
    codec: object  # ladd_ds.models.codec codec
    kind: str  # "student" (LADD sampler) or "teacher" (Euler + CFG)
    shift: float = DEFAULT_SHIFT  # teacher schedule shift (models/scheduler.py: the folder's)
    num_train_timesteps: int = 1000  # the teacher scheduler's training table: its smallest sigma
    info: dict = field(default_factory=dict)

    @property
    def factor(self) -> int:
        return self.codec.factor

    @property
    def trained(self) -> TrainedTimes | None:
        """A student's trained input times as its export records them; None for a teacher and for
        exports written before the timesteps were recorded."""
        return TrainedTimes.from_record(self.info.get("sampling", {}))


def student_schedule(steps: int, trained: TrainedTimes | None = None) -> list[float]:
    """The student's input times for an N-step sample: 1, 1 - 1/N, ... (4 steps: 1, .75, .5, .25,
    the paper's training set; 2 steps: 1, .5; 1 step: 1). With `trained` (the run's
    ladd.student_timesteps and their probabilities), a schedule that uses a time the student never
    trained on, not in the set or drawn with probability 0, is refused. Every student sampler
    (`ladd-ds sample`, the evaluations, the demo, the training preview) gets its schedule here."""
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    schedule = [1.0 - i / steps for i in range(steps)]
    if trained is None:
        return schedule
    drawn = trained.drawn()
    untrained = [t for t in schedule if not _is_trained([t], drawn)]
    if untrained:
        zero = [round(t, 3) for t in untrained if _is_trained([t], trained.timesteps)]
        never = f" ({zero} had probability 0)" if zero else ""
        raise InputError(
            f"--steps {steps}: the student was trained on {trained.describe()}, which gives samples of "
            f"{trained_step_counts(trained)} steps; {steps} steps would use the untrained t = "
            f"{[round(t, 3) for t in untrained]}{never}"
        )
    return schedule


def _is_trained(schedule: list[float], trained) -> bool:
    return all(any(abs(t - u) < 1e-6 for u in trained) for t in schedule)


def trained_step_counts(trained: TrainedTimes, up_to: int = 16) -> list[int]:
    """The step counts N <= up_to whose schedule 1, 1 - 1/N, ... uses only trained times."""
    drawn = trained.drawn()
    return [n for n in range(1, up_to + 1) if _is_trained([1.0 - i / n for i in range(n)], drawn)]


@torch.no_grad()
def ladd_sample(
    model,
    embeds,
    pooled,
    noise: torch.Tensor,
    schedule: list[float],
    seeds: list[int],
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/method.md, section 4: start from noise at t = schedule[0], predict x0, re-noise it to the next t
    with fresh noise (per sample, from its seed), repeat; no CFG. `model` is a FlowModel; an
    inpainting or editing student gets its `condition` (B, extra, h, w) after every input."""
    x = noise
    for k, t in enumerate(schedule):
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0 = x0_from_velocity(x, model(join_condition(x, condition), tt, embeds, pooled), tt)  # (B, C, h, w)
        if k + 1 == len(schedule):
            return x0
        fresh = torch.stack(
            [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(derive_seed(s, k, "renoise"))) for s in seeds]
        ).to(x)
        x = add_noise(x0, fresh, torch.full_like(tt, schedule[k + 1]))
    return x


class TeacherSampler:
    """Classifier-free-guided sampling of the teacher with diffusers' SD3 pipeline."""

    def __init__(self, transformer, text_encoder, shift: float, codec_factor: int, *, num_train_timesteps: int = 1000):
        self.transformer = transformer
        self.text = text_encoder
        self.factor = codec_factor
        self.pipe = text_encoder.pipe
        self.pipe.transformer = transformer
        self.pipe.vae_scale_factor = codec_factor  # the pipeline checks height/width against it
        self.pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        self.pipe.set_progress_bar_config(disable=True)
        self._negative = None  # the empty prompt's conditioning, encoded on first use

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        height: int,
        width: int,
        device,
        num_steps: int,
        guidance_scale: float,
        conditioning: tuple[torch.Tensor, torch.Tensor] | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, height/f, width/f) normalized latents; the initial noise of prompt i comes from
        a generator seeded with seeds[i]. `conditioning`: the prompts' (prompt_embeds, pooled)
        when the caller encoded them already (synth stores them). `condition` (B, extra, h, w):
        the image condition of an inpainting or editing teacher, in both guidance branches (the
        pipeline batches [unconditional, conditional]; join_condition repeats it)."""
        # The pipeline samples a text-to-image-looking transformer: the wrapper joins the condition.
        self.pipe.transformer = self.transformer
        if condition is not None:
            self.pipe.transformer = ConditionedTransformer(self.transformer, condition.to(device, self.transformer.dtype))
        dtype = self.pipe.transformer.dtype  # bf16 runs: encoders, noise and latents in bf16 as well
        embeds, pooled = (x.to(device, dtype) for x in (conditioning or self.text.encode(prompts, device)))
        # The empty prompt, encoded once per sampler, then one copy per sample.
        if self._negative is None:
            self._negative = self.text.encode([""], device)
        neg_embeds, neg_pooled = (x.to(device, dtype).expand(len(prompts), *x.shape[1:]) for x in self._negative)
        channels = latent_channels(self.pipe.transformer.config)
        noise = initial_noise(seeds, channels, height // self.factor, width // self.factor)
        return self.pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=neg_embeds,
            negative_pooled_prompt_embeds=neg_pooled,
            latents=noise.to(device=device, dtype=dtype),
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            output_type="latent",
            return_dict=False,
        )[0]  # (B, C, h, w), normalized latent space


def initial_noise(seeds: list[int], channels: int, h: int, w: int) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, sample i from a generator seeded with seeds[i]."""
    return torch.stack([torch.randn(channels, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])


def load_text_encoder(cfg, device):
    """The text encoders of the config's text section in the run's precision: what synth, encode,
    pairs and the training previews encode prompts with (diffusers' SD3 pipeline runs its
    encoders in the pipeline's dtype too)."""

    t = cfg.text
    text = text_encoders_from_spec(
        t.encoders, cfg.model.teacher, drop_t5=t.drop_t5, max_sequence_length=t.max_sequence_length, seed=t.seed
    )
    return text.to(device, dtype_of(cfg.deepspeed.precision, key="deepspeed.precision"))


def network_evaluations(kind: str, steps: int, cfg: float) -> int:
    """Transformer calls per image: CFG doubles every teacher step (conditional + unconditional)."""
    return steps * (2 if kind == "teacher" and cfg > 1.0 else 1)


def decode_images(codec, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (N, 3, H, W) in [0, 1] on the CPU (codecs decode to [-1, 1])."""
    return ((codec.decode(latents.float()) + 1.0) / 2.0).clamp(0, 1).cpu()


def condition_columns(codec, task: str, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The condition of `task` as the data layouts store it (schema.INPAINT / EDIT): images
    (N, 3, H, W) in [-1, 1] and, for inpainting, pixel masks (N, 1, H, W), 1 = fill in ->
    inpaint: {"condition": masked-image latent (N, C, h, w), "mask": (N, 1, h, w)};
    edit: {"condition": the image's latent (N, C, h, w)}; t2i: {}."""
    if task == "inpaint":
        if masks is None:
            raise InputError("an inpainting condition needs a mask (1 = fill in) for every image")
        latent, mask = inpaint_condition(codec, images, masks.to(images))
        return {"condition": latent, "mask": mask}
    if task == "edit":
        return {"condition": codec.encode(images)}
    return {}


@torch.no_grad()
def task_condition(sm: SamplingModel, task: str, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The condition channels (N, extra, H/f, W/f) that `sm` (a model of `task`) samples from:
    conditioning.batch_condition of condition_columns, made with the model's latent codec."""
    have = model_task(sm.transformer.config)
    if have != task:
        raise InputError(f"this model's task is {have}: a condition for {task} does not fit it")
    device = next(sm.transformer.parameters()).device  # where load_sampling_model put the codec too
    masks = None if masks is None else masks.to(device)
    return batch_condition(condition_columns(sm.codec, task, images.to(device).float(), masks), task)


def check_condition(config, condition: torch.Tensor | None, *, n: int, h: int, w: int) -> None:
    """A condition fits the transformer: present exactly for inpainting and editing models, with
    (n, in_channels - latent channels, h, w)."""
    task = model_task(config)
    if task == "t2i":
        if condition is not None:
            raise InputError("this is a text-to-image model: it takes no image condition (--image, --mask)")
        return
    if condition is None:
        needs = "--image and --mask" if task == "inpaint" else "--image (and an instruction as the prompt)"
        raise InputError(f"this is an {task} model: it samples from an image condition; pass {needs}")
    extra = config.in_channels - latent_channels(config)
    if tuple(condition.shape) != (n, extra, h, w):
        raise InputError(f"the condition has shape {tuple(condition.shape)}; this {task} model needs {(n, extra, h, w)}")


def check_size(sm: SamplingModel, height: int, width: int) -> None:
    """A sample size the model can make: multiples of codec factor x patch, within its position embeddings."""
    config = sm.transformer.config
    step = sm.factor * config.patch_size
    if height % step or width % step:
        raise InputError(f"size {height}x{width}: height and width must be multiples of {step} (codec x patch)")
    if config.pos_embed_max_size and max(height, width) > config.pos_embed_max_size * step:
        raise InputError(
            f"size {height}x{width}: this model's position embeddings cover at most "
            f"{config.pos_embed_max_size * step} pixels per side; pass a smaller --size"
        )


@torch.no_grad()
def sample_latents(
    sm: SamplingModel,
    prompts: list[str],
    seeds: list[int],
    *,
    height: int,
    width: int,
    steps: int,
    cfg: float,
    batch_size: int = 32,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents (N, C, H/f, W/f) of `prompts`, one per seed: the student's sampler or the
    teacher's Euler sampler with CFG, depending on `sm.kind`. An inpainting or editing model
    needs `condition` (N, extra, H/f, W/f): task_condition's channels, one per sample."""

    device = next(sm.transformer.parameters()).device
    config = sm.transformer.config
    check_size(sm, height, width)
    teacher = None
    if sm.kind == "teacher":
        teacher = TeacherSampler(sm.transformer, sm.text, sm.shift, sm.factor, num_train_timesteps=sm.num_train_timesteps)
    student = FlowModel(sm.transformer) if sm.kind == "student" else None
    if student is not None:
        schedule = student_schedule(steps, sm.trained)
    check_condition(config, condition, n=len(prompts), h=height // sm.factor, w=width // sm.factor)
    channels = latent_channels(sm.transformer.config)  # the noise has the latent's channels, not in_channels
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        c = None if condition is None else condition[i : i + batch_size].to(device, sm.transformer.dtype)
        if teacher is not None:
            out.append(
                teacher.sample(p, s, height=height, width=width, device=device, num_steps=steps, guidance_scale=cfg, condition=c)
            )
        else:
            embeds, pooled = (x.to(sm.transformer.dtype) for x in sm.text.encode(p, device))
            noise = initial_noise(s, channels, height // sm.factor, width // sm.factor).to(device, sm.transformer.dtype)
            out.append(ladd_sample(student, embeds, pooled, noise, schedule, s, c))
    return torch.cat(out)


def generate(
    sm: SamplingModel,
    prompts: list[str],
    seeds: list[int],
    *,
    height: int,
    width: int,
    steps: int,
    cfg: float,
    batch_size: int = 32,
    condition: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Images (N, 3, H, W) in [0, 1] and the wall time in seconds (sampling + decoding)."""
    start = time.perf_counter()
    latents = sample_latents(
        sm, prompts, seeds, height=height, width=width, steps=steps, cfg=cfg, batch_size=batch_size, condition=condition
    )
    images = decode_images(sm.codec, latents)
    return images, time.perf_counter() - start


def _max_sequence_length(info: dict) -> int:
    # "max_t5_tokens": the same setting in folders written before it was renamed
    return int(info.get("max_sequence_length", info.get("max_t5_tokens", 256)))


def load_sampling_model(spec: str | Path, device="cpu", precision: str = "fp32") -> SamplingModel:
    """The model, text encoders and latent codec `spec` names (see the module docstring).
    `precision`: the transformer's and the text encoders' dtype (the latent codec stays fp32)."""
    dtype = dtype_of(precision, key="precision")

    folder = Path(spec)
    if not (folder / "transformer" / "config.json").is_file():
        hint = " (a run directory: `ladd-ds export` it first)" if (folder / "checkpoints").is_dir() else ""
        raise InputError(f"--model {spec}: expected a ladd-ds export or a diffusers SD3 folder{hint}")
    # The dtype at load, not `.to(dtype)` after it: diffusers 0.39 warns at every cast with `to()`.
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).to(device).eval()
    channels = latent_channels(transformer.config)
    if (folder / EXPORT_INFO).is_file():  # a LADD student
        info = json.loads((folder / EXPORT_INFO).read_text())
        s = info.get("sampling")
        if s is None:
            raise InputError(f"{folder / EXPORT_INFO} has no 'sampling' entry: re-export the run with this version")
        text_seed = s.get("text_seed", s.get("seed", 0))  # "seed": exports written before the text section
        text = text_encoders_from_spec(
            s["text_encoders"], s["teacher"], drop_t5=s["drop_t5"], max_sequence_length=_max_sequence_length(s), seed=text_seed
        )
        codec = load_codec(s["codec"], channels, seed=s.get("codec_seed", s.get("seed", 0)))
        return SamplingModel(transformer, text.to(device, dtype), codec.to(device), "student", info=info)
    info = json.loads((folder / MODEL_INFO).read_text()) if (folder / MODEL_INFO).is_file() else {}
    if "codec" not in info and not (folder / "vae").is_dir():
        raise InputError(f"{folder}: no vae/ and no {MODEL_INFO} naming a latent codec; cannot decode images")
    drop_t5 = not (folder / "text_encoder_3").is_dir()
    text = text_encoders_from_spec(
        str(folder), str(folder), drop_t5=drop_t5, max_sequence_length=_max_sequence_length(info), seed=0
    )
    codec = load_codec(info.get("codec", str(folder)), channels)
    settings = folder_sampler_settings(folder, info)
    return SamplingModel(
        transformer,
        text.to(device, dtype),
        codec.to(device),
        "teacher",
        shift=settings.shift,
        num_train_timesteps=settings.num_train_timesteps,
        info=info,
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, rows: int, *, pad: int = 2, zoom: int | None = None) -> np.ndarray:
    """(N, 3, H, W) -> one (rows*(H+pad), cols*(W+pad), 3) uint8 picture, row-major. Each image is
    enlarged `zoom` times (nearest neighbour); by default small images (the CPU demo's 16x16) are
    enlarged to at least 64 pixels so that a grid is readable."""
    zoom = zoom or max(1, 64 // min(images.shape[-2:]))
    if zoom > 1:
        images = images.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    n, _, h, w = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, dtype=np.uint8)
    for i, im in enumerate(to_uint8(images)):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return grid


# The mark of a sample set (ladd_ds.core.outputs): the model it came from, in the PNG's text chunk
# and as an entry of the npz. Only files that carry it are replaced.
SAMPLES_KEY = "ladd_ds_samples"


def _sample_source(path: Path) -> str | None:
    """The model a ladd-ds sample file records, or None for a file that ladd-ds did not write."""

    try:
        if path.suffix == ".png":
            with Image.open(path) as im:
                return im.text.get(SAMPLES_KEY)
        with np.load(path) as npz:
            return str(npz[SAMPLES_KEY]) if SAMPLES_KEY in npz.files else None
    except Exception:  # not an image or archive at all (or not readable): not ours
        return None


def check_sample_outputs(out: str | Path, source: str, overwrite: bool = False) -> None:
    """Refuse to write OUT.png / OUT.npz over a file ladd-ds did not write, or over samples of
    another model without `overwrite` (OutputExistsError)."""

    for path in (Path(out).with_suffix(".png"), Path(out).with_suffix(".npz")):
        if not path.exists():
            continue
        found = None if path.is_dir() else _sample_source(path)
        if found is None:
            raise OutputExistsError(f"--out {out}: {path} exists and was not written by ladd-ds sample; pass another --out")
        if found != source and not overwrite:
            raise OutputExistsError(
                f"--out {out}: {path} holds samples of {found}, not of {source}; "
                "pass --overwrite to replace them, or another --out"
            )


def save_samples(
    out: Path,
    images: torch.Tensor,
    prompt_index: list[int],
    seeds: list[int],
    prompts: list[str],
    rows: int,
    source: str = "",
    overwrite: bool = False,
):
    """out.png (grid, `rows` rows; small images enlarged, see image_grid) and out.npz (the images
    at their own size), each written to a temporary name first, both marked with `source` (the
    model). Files at out.png / out.npz are replaced only when they are samples of the same model
    (of any model with `overwrite`)."""

    out = Path(out)
    check_sample_outputs(out, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, npz = out.with_suffix(".png"), out.with_suffix(".npz")
    tmp_png, tmp_npz = png.with_name(f".{png.name}.tmp.png"), npz.with_name(f".{npz.stem}.tmp.npz")
    info = PngInfo()
    info.add_text(SAMPLES_KEY, source)
    Image.fromarray(image_grid(images, rows)).save(tmp_png, pnginfo=info)
    np.savez_compressed(
        tmp_npz,
        images=to_uint8(images),
        prompt_index=np.array(prompt_index),
        seeds=np.array(seeds),
        prompts=np.array(prompts),
        **{SAMPLES_KEY: np.array(source)},
    )
    tmp_png.replace(png)
    tmp_npz.replace(npz)
    return png, npz


def default_size(sm: SamplingModel) -> tuple[int, int]:
    """The image size `ladd-ds sample` uses without --size: the one the model records (a demo
    teacher's ladd_model.json, a student's first training bucket), else the transformer's
    sample_size in pixels (1024x1024 for SD3)."""
    recorded = sm.info.get("default_size") or sm.info.get("sampling", {}).get("default_size")
    if recorded:
        return int(recorded[0]), int(recorded[1])
    side = sm.transformer.config.sample_size * sm.factor
    return side, side


TEACHER_STEPS = 28  # `ladd-ds sample` of a teacher without --steps (SD3's released default)


def default_steps(sm: SamplingModel) -> tuple[int, str]:
    """The step count `ladd-ds sample` uses without --steps, and why: a student's largest trained
    count (its export records ladd.student_timesteps and their probabilities: 1, .75, .5, .25, each
    drawn, gives 4), a teacher's 28."""
    if sm.kind == "teacher":
        return TEACHER_STEPS, "a teacher's default"
    trained = sm.trained
    if trained is None:  # exports written before the timesteps were recorded
        return 4, "the paper's student"
    counts = trained_step_counts(trained)
    # No count fits when 1.0 was not trained: student_schedule then says which times are missing.
    return (max(counts), "the student's trained maximum") if counts else (len(trained.drawn()), "one per trained time")


def parse_size(size: str, *, what: str = "--size") -> tuple[int, int]:
    """`--size HxW` in pixels; `what` names where the size came from in the error."""
    try:
        height, width = parse_bucket(size)
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise InputError(f"{what} {size}: expected HEIGHTxWIDTH in pixels, e.g. 128x128")
    return height, width


def check_sample_args(
    prompts_file: str, *, steps: int | None, per_prompt: int, size: str | None
) -> tuple[list[str], tuple[int, int] | None]:
    """`ladd-ds sample`'s arguments that need no model, checked before one is loaded (or a run
    exported): the prompts of the file, and --size as (height, width) or None."""

    if per_prompt < 1:
        raise InputError(f"--per-prompt {per_prompt}: must be >= 1 (images per prompt)")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: must be >= 1")
    size_hw = parse_size(size) if size else None
    path = Path(prompts_file)
    lines = numbered_lines(path, what="prompt file", expected="prompts (one per line, or JSONL with a 'prompt')")
    return [prompt_record(path, n, line)["prompt"] for n, line in lines], size_hw


def run_sample(
    model: str,
    *,
    prompts_file: str,
    steps: int | None,
    cfg: float | None,
    seed: int,
    out: str,
    per_prompt: int,
    size: str | None,
    lora: str | None = None,
    precision: str = "fp32",
    image: str | None = None,
    mask: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
):
    """`ladd-ds sample`. `source`: what the samples record as their model (default: `model`,
    absolute); OUT.png / OUT.npz of another model are replaced only with `overwrite`."""

    made_by = source or str(absolute(model))
    out_pasted = Path(out).with_name(Path(out).with_suffix("").name + "_pasted")
    for target in (out, out_pasted):
        check_sample_outputs(target, made_by, overwrite)  # before any model is loaded
    prompts, size_hw = check_sample_args(prompts_file, steps=steps, per_prompt=per_prompt, size=size)
    sm = load_sampling_model(model, precision=precision)
    if lora is not None:
        load_lora(sm.transformer, lora, merge=True)
    if cfg is None:
        cfg = 1.0 if sm.kind == "student" else 4.0
    if sm.kind == "student" and cfg != 1.0:
        raise InputError("--cfg: the LADD student samples without guidance (docs/method.md, section 4); leave --cfg unset or 1")
    if steps is None:
        steps, why = default_steps(sm)
        print(f"--steps {steps}: {why} (pass --steps to change it)")
    height, width = size_hw or default_size(sm)
    index = [i for i in range(len(prompts)) for _ in range(per_prompt)]
    seeds = [derive_seed(seed, i, j) for i in range(len(prompts)) for j in range(per_prompt)]
    task = model_task(sm.transformer.config)
    check_size(sm, height, width)  # before the condition is cut and encoded at that size
    source, pixel_mask = load_condition_images(task, image=image, mask=mask, height=height, width=width)
    condition = None
    if task != "t2i":
        condition = task_condition(sm, task, source[None], None if pixel_mask is None else pixel_mask[None])
        condition = condition.expand(len(index), *condition.shape[1:])  # the same image for every sample
    images, seconds = generate(
        sm, [prompts[i] for i in index], seeds, height=height, width=width, steps=steps, cfg=cfg, condition=condition
    )
    png, npz = save_samples(Path(out), images, index, seeds, prompts, rows=len(prompts), source=made_by, overwrite=overwrite)
    nfe = network_evaluations(sm.kind, steps, cfg)
    print(f"{sm.kind}: {len(images)} images {height}x{width}, {steps} steps, CFG {cfg}, {nfe} NFE/image, "
          f"{1000 * seconds / len(images):.1f} ms/image -> {png}, {npz}")  # fmt: skip
    if task == "inpaint":  # the result inside the hole, the given image everywhere else
        pasted = paste_back(images, (source[None] + 1.0) / 2.0, pixel_mask[None])
        pasted_png, pasted_npz = save_samples(
            out_pasted, pasted, index, seeds, prompts, rows=len(prompts), source=made_by, overwrite=overwrite
        )
        print(f"inpaint: pasted back into the kept area -> {pasted_png}, {pasted_npz}")
    return png, npz


def load_condition_images(
    task: str, *, image: str | None, mask: str | None, height: int, width: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`--image` (3, H, W) in [-1, 1] and `--mask` (1, H, W), 1 = fill in, cut to the sample size,
    as a model of `task` needs them: inpaint both, edit the image, t2i neither."""

    needs = {"t2i": (), "inpaint": ("--image", "--mask"), "edit": ("--image",)}[task]
    given = [flag for flag, value in (("--image", image), ("--mask", mask)) if value is not None]
    for flag in given:
        if flag not in needs:
            what = "a text-to-image model takes no image" if task == "t2i" else f"an {task} model takes no mask"
            raise InputError(f"{flag}: {what}; leave it out")
    missing = [flag for flag in needs if flag not in given]
    if missing:
        raise InputError(f"this is an {task} model: pass {' and '.join(missing)} (an image file; mask: white = fill in)")
    for flag, path in (("--image", image), ("--mask", mask)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    try:
        source = load_cropped(image, height, width) if image else None
        pixel_mask = load_mask(mask, height, width) if mask else None
    except (OSError, ValueError) as e:
        raise InputError(f"--image / --mask: cannot read the image ({e})") from None
    if pixel_mask is not None and not pixel_mask.any():
        raise InputError(f"--mask {mask}: no white pixels, nothing to fill in (white = fill in, black = keep)")
    return source, pixel_mask
