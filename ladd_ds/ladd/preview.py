"""Sample grids in TensorBoard during training (`logging.sample_every`).

Every rank runs the same student forwards (a ZeRO-3 module needs all ranks in every forward);
the main rank logs one grid per step count: a row per prompt of `logging.sample_prompts`, at the
size of the first synth bucket, with fixed noise so the grids of successive steps compare.
Image-conditioned runs (`ladd.task`) sample every prompt on one condition, the first sample of
the training data (its size, not the bucket's): an inpainting or editing grid shows what each
prompt does to the same image.
"""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import join_condition, latent_channels
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.sampling import (
    TrainedTimes,
    decode_images,
    image_grid,
    initial_noise,
    ladd_sample,
    load_text_encoder,
    student_schedule,
    trained_step_counts,
)

PREVIEW_STEPS = (1, 4)  # those of them that use only trained times (ladd.student_timesteps, probability > 0)


class SamplePreview:
    def __init__(self, cfg: Config, device: torch.device, condition: torch.Tensor | None = None):
        """`condition`: (extra, h, w), the condition channels every prompt is sampled on (image-
        conditioned runs), else None."""
        model_cfg = resolve_model_config(cfg.model.student or cfg.model.teacher)
        self.text = load_text_encoder(cfg, device)
        self.codec = load_codec(cfg.codec.vae, latent_channels(model_cfg), seed=cfg.codec.seed).to(device)
        self.prompts = list(cfg.logging.sample_prompts or [])
        self.trained = TrainedTimes.from_config(cfg.ladd)
        self.steps = [n for n in PREVIEW_STEPS if n in trained_step_counts(self.trained)]
        height, width = cfg.synth.buckets[0]
        shape = (latent_channels(model_cfg), height // self.codec.factor, width // self.codec.factor)
        self.condition = None
        if condition is not None:
            shape = (shape[0], *condition.shape[1:])
            self.condition = condition.to(device).expand(len(self.prompts), *condition.shape)  # (N, extra, h, w)
        self.seeds = list(range(len(self.prompts)))
        self.noise = initial_noise(self.seeds, *shape).to(device)
        self.embeds, self.pooled = self.text.encode(self.prompts, device)

    @torch.no_grad()
    def grids(self, student: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{"samples/student_Nstep": (3, H, W) uint8} for every preview step count."""
        was_training = student.training
        student.eval()
        out = {}
        for steps in self.steps:
            schedule = student_schedule(steps, self.trained)
            model = student
            if self.condition is not None:
                condition = self.condition.to(dtype)
                model = lambda x, *args: student(join_condition(x, condition), *args)  # noqa: E731
            latents = ladd_sample(model, self.embeds.to(dtype), self.pooled.to(dtype), self.noise.to(dtype), schedule, self.seeds)
            images = decode_images(self.codec, latents)
            out[f"samples/student_{steps}step"] = torch.from_numpy(image_grid(images, rows=len(self.prompts))).permute(2, 0, 1)
        student.train(was_training)
        return out
