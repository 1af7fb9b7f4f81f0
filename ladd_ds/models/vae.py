"""The SD3 VAE (diffusers AutoencoderKL): a local folder's `vae/`, or a tiny one built in code.

Encoding to and decoding from SD3's normalized latent space: ladd_ds.models.codec.VAECodec.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ladd_ds.core.errors import InputError


def build_tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """Random-weight VAE with SD3's 8x downsampling (4 blocks) and SD3's shift/scale numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        ).eval()


def load_vae(spec: str, latent_channels: int, *, seed: int = 0) -> AutoencoderKL:
    if spec == "tiny":
        return build_tiny_vae(latent_channels, seed)
    folder = Path(spec)
    if not (folder / "vae" / "config.json").is_file():
        raise InputError(f"VAE: {folder} has no vae/config.json; pass a diffusers SD3 folder or 'tiny'")
    return AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
