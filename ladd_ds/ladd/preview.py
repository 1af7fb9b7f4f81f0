"""Sample grids in TensorBoard during training (`logging.sample_every`).

Every rank runs the same student forwards (a ZeRO-3 module needs all ranks in every forward);
the main rank logs one grid per step count: a row per prompt of `logging.sample_prompts`, at the
size of the first synth bucket, with fixed noise so the grids of successive steps compare.
"""

from __future__ import annotations

import torch

from ladd_ds.config import Config
from ladd_ds.models.codec import load_codec
from ladd_ds.models.conditioning import latent_channels
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.sampling import (
    decode_images,
    image_grid,
    initial_noise,
    ladd_sample,
    load_text_encoder,
    student_schedule,
    trained_step_counts,
)

PREVIEW_STEPS = (1, 4)  # those of them that use only trained times (ladd.student_timesteps)


class SamplePreview:
    def __init__(self, cfg: Config, device: torch.device):
        model_cfg = resolve_model_config(cfg.model.student or cfg.model.teacher)
        self.text = load_text_encoder(cfg, device)
        self.codec = load_codec(cfg.codec.vae, latent_channels(model_cfg), seed=cfg.codec.seed).to(device)
        self.prompts = list(cfg.logging.sample_prompts or [])
        self.trained = list(cfg.ladd.student_timesteps)
        self.steps = [n for n in PREVIEW_STEPS if n in trained_step_counts(self.trained)]
        height, width = cfg.synth.buckets[0]
        shape = (latent_channels(model_cfg), height // self.codec.factor, width // self.codec.factor)
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
            latents = ladd_sample(
                student, self.embeds.to(dtype), self.pooled.to(dtype), self.noise.to(dtype), schedule, self.seeds
            )
            images = decode_images(self.codec, latents)
            out[f"samples/student_{steps}step"] = torch.from_numpy(image_grid(images, rows=len(self.prompts))).permute(2, 0, 1)
        student.train(was_training)
        return out
