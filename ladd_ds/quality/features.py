"""Feature networks for Fréchet distance and KID, each from local weights (nothing is downloaded).

`load_feature_network(path)` takes
- a file: the FID Inception-v3 weights in torch-fidelity's format
  (pt_inception-2015-12-05-6726825d.pth), run through torchmetrics' NoTrainInceptionV3 as FID
  defines it (2048 pool features, images resized to 299x299);
- a folder of a transformers image encoder (save_pretrained, with its preprocessor_config.json):
  DINOv2 (FD_DINOv2: the CLS token), a CLIP model or CLIP vision model (the projected image
  embedding), or any AutoModel with `get_image_features` or a pooled output.
Every network maps images (N, 3, H, W) in [0, 1] to features (N, D); `name` says which space the
distances are measured in (a report names it next to every FD).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ladd_ds.core.errors import InputError, MissingInputError

INCEPTION_SUFFIXES = (".pth", ".pt", ".bin")


class FeatureNetwork(nn.Module):
    """images (N, 3, H, W) in [0, 1] -> features (N, num_features), float32."""

    name: str = "features"
    num_features: int = 0


class InceptionFeatures(FeatureNetwork):
    """FID's Inception-v3 (torchmetrics' NoTrainInceptionV3: torch-fidelity's port of the
    TensorFlow graph) from a weights file; the 2048-wide pool features."""

    num_features = 2048

    def __init__(self, weights: Path, *, what: str = "--features"):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
            )
        except (RuntimeError, KeyError, OSError) as e:
            raise InputError(
                f"{what} {weights}: not FID Inception-v3 weights in torch-fidelity's format ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); pass pt_inception-2015-12-05-6726825d.pth or an image-encoder folder"
            ) from None
        self.name = f"Inception-v3 pool ({weights.name})"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net((images.clamp(0, 1) * 255).round().to(device, torch.uint8)).float()


class EncoderFeatures(FeatureNetwork):
    """A transformers image encoder and its image processor, both from one folder."""

    def __init__(self, folder: Path, *, what: str = "--features"):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = AutoConfig.from_pretrained(folder)
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise InputError(
                f"{what} {folder}: no image processor ({e.__class__.__name__}); the folder needs the "
                "preprocessor_config.json its model was released with"
            ) from None
        self.model = AutoModel.from_pretrained(folder, config=config).eval()
        self.model_type = config.model_type
        with torch.no_grad():
            probe = self._encode(torch.zeros(1, 3, 32, 32))
        self.num_features = int(probe.shape[-1])
        self.name = f"{config.model_type} ({folder.name})"

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        device = next(self.model.parameters()).device
        inputs = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"].to(device, self.model.dtype)
        if hasattr(self.model, "get_image_features"):  # CLIP, SigLIP: the projected embedding
            out = self.model.get_image_features(pixel_values=inputs)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        out = self.model(pixel_values=inputs)
        if getattr(out, "image_embeds", None) is not None:  # CLIPVisionModelWithProjection
            return out.image_embeds.float()
        if getattr(out, "pooler_output", None) is not None:  # DINOv2: the normalised CLS token
            return out.pooler_output.float()
        return out.last_hidden_state[:, 0].float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)


class ModuleFeatures(FeatureNetwork):
    """Any module that maps images in [0, 1] to (N, D) features, e.g. the demo's digit classifier."""

    def __init__(self, module: nn.Module, *, name: str, num_features: int):
        super().__init__()
        self.module = module.eval()
        self.name = name
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.module.parameters()).device
        return self.module(images.to(device)).float()


def load_feature_network(path: str | Path, device: torch.device | str = "cpu", *, what: str = "--features") -> FeatureNetwork:
    """The feature network at `path` (see the module docstring), on `device`, in eval mode; `what`:
    how the user named it, for errors."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in INCEPTION_SUFFIXES:
            raise InputError(
                f"{what} {path}: a weights file must be FID's Inception-v3 in torch-fidelity's format "
                f"({', '.join(INCEPTION_SUFFIXES)}); for another encoder pass its folder"
            )
        return InceptionFeatures(path, what=what).to(device).eval()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{what} {path}: no config.json; pass a transformers image-encoder folder (save_pretrained)")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type is None:
            raise InputError(f"{what} {path}/config.json: no model_type; not a transformers model folder")
        return EncoderFeatures(path, what=what).to(device).eval()
    raise MissingInputError(f"{what} {path} does not exist; pass an Inception-v3 weights file or an image-encoder folder")


@torch.no_grad()
def features_of(net: FeatureNetwork, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """(N, D) float32 features of images (N, 3, H, W) in [0, 1], on the CPU, in `batch_size` batches."""
    return torch.cat([net(images[i : i + batch_size]).cpu() for i in range(0, len(images), batch_size)])
