"""What a `synth` / `encode` output root says about itself: manifest.json and the empty prompt's
conditioning stored next to it (negative_prompt.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ladd_ds.core.errors import InputError, MissingInputError
from ladd_ds.data.schema import MANIFEST_FILE, NEGATIVE_PROMPT_FILE


def read_manifest(root: str | Path) -> dict | None:
    """ROOT/manifest.json, or None for a root without one (a single dataset, random latents) or a
    remote URL."""
    path = Path(str(root)) / MANIFEST_FILE
    if "://" in str(root) or not path.is_file():
        return None
    return json.loads(path.read_text())


def generation_guidance_scale(root: str | Path) -> float | None:
    """The classifier-free guidance scale the teacher generated ROOT's latents with; 1.0 for
    encoded real images (no guidance); None when the root does not say (no manifest)."""
    manifest = read_manifest(root)
    if manifest is None:
        return None
    if manifest.get("source", {}).get("kind") != "teacher samples":
        return 1.0
    return float(manifest["synth"]["guidance_scale"])


TEXT_SETTINGS = ("max_sequence_length", "drop_t5")  # what shapes the stored conditioning


def check_text_settings(root: str | Path, text) -> None:
    """Refuse a run whose text settings (the config's text section) differ from those ROOT's data
    was written with: previews and the export's `ladd-ds sample` would feed another conditioning
    than training."""
    manifest = read_manifest(root)
    if manifest is None:
        return
    # Manifests written before the text section kept these under "synth".
    recorded = manifest.get("text") or manifest.get("synth", {})
    for key in TEXT_SETTINGS:
        written = recorded.get(key)
        if written is not None and written != getattr(text, key):
            raise InputError(
                f"text.{key} = {getattr(text, key)!r}, but {root} was written with {written!r} "
                f"({Path(str(root)) / MANIFEST_FILE}): set text.{key}: {written!r} so that previews and "
                "the exported student's sampling use the conditioning it is trained on"
            )


def read_negative_prompt(root: str | Path, needed_by: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's conditioning of ROOT: prompt_embeds (L, D) and pooled (P,), fp32.
    `needed_by` names the setting that needs it, for the error message."""

    path = Path(str(root)) / NEGATIVE_PROMPT_FILE
    if "://" in str(root):
        raise InputError(
            f"{needed_by} needs {NEGATIVE_PROMPT_FILE} of data.path; with a remote data.path it is not read yet: set it to 1"
        )
    if not path.is_file():
        raise MissingInputError(
            f"{needed_by} needs {path} (the empty prompt's conditioning, written by this version of "
            "`ladd-ds synth` / `ladd-ds encode`): regenerate the data with this version, or set it to 1"
        )
    tensors = load_file(str(path))
    return tensors["prompt_embeds"], tensors["pooled"]
