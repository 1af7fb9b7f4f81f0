"""Latent codecs: the map between images and the latent grid the transformer sees.

Two kinds, chosen by the `codec.vae` spec:
- a diffusers `AutoencoderKL` ("tiny", built in code, or a local SD3 folder's `vae/`): SD3's
  normalized latents `(z - shift_factor) * scaling_factor`, 8x downsampling;
- "pixel-unshuffle" (the CPU demo): no learned model, an exact invertible rearrangement. An RGB
  image in [-1, 1] of shape (3, H, W) becomes (12, H/2, W/2) by pixel-unshuffle with factor 2
  (each latent pixel holds a 2x2 block of RGB values); decoding is pixel-shuffle.

Images are in [-1, 1] on both sides (the diffusers convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ladd_ds.core.errors import InputError
from ladd_ds.models.vae import load_vae

PIXEL_UNSHUFFLE = "pixel-unshuffle"


class PixelUnshuffleCodec:
    """(B, 3, H, W) <-> (B, 3 f^2, H/f, W/f), lossless."""

    def __init__(self, factor: int = 2):
        self.factor = factor
        self.channels = 3 * factor**2

    def to(self, device) -> PixelUnshuffleCodec:
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)


class VAECodec:
    """A diffusers AutoencoderKL in SD3's normalized latent space."""

    def __init__(self, vae):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels

    def to(self, device) -> VAECodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # The posterior mean, so that an encoded sample is reproducible.
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return (z - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(z).sample


def load_codec(spec: str, latent_channels: int, *, seed: int = 0) -> PixelUnshuffleCodec | VAECodec:
    """`spec`: "pixel-unshuffle", "tiny" (random tiny VAE) or a local SD3 folder with vae/."""
    if spec == PIXEL_UNSHUFFLE:
        codec = PixelUnshuffleCodec()
    else:
        codec = VAECodec(load_vae(spec, latent_channels, seed=seed))
    if codec.channels != latent_channels:
        raise InputError(f"latent codec '{spec}' has {codec.channels} channels, the model expects {latent_channels}")
    return codec


def codec_factor(spec: str) -> int:
    """Spatial downsampling of a codec spec without loading weights (8 for every SD3 VAE)."""
    return PixelUnshuffleCodec().factor if spec == PIXEL_UNSHUFFLE else 8
