"""The teacher's sampler settings, read from its folder: the schedule shift `a` (sigma = a t /
(1 + (a - 1) t)) and the training table's length, which the teacher's Euler sampler
(ladd_ds.sampling.TeacherSampler) and DPO's time density (dpo.time_shift) use.

Where they come from, for a model spec (model.teacher, `ladd-ds sample --model`):
- a diffusers folder with scheduler/scheduler_config.json: its FlowMatchEulerDiscreteScheduler
  settings, a missing key taking the scheduler's own default (as diffusers loads it: shift 1);
- a folder whose ladd_model.json records a "shift" (the demo's teachers, which have no
  scheduler/): that shift; a folder with both must agree;
- otherwise (a preset, a folder with neither): shift 3, the released SD3 models' setting.

The sampler is diffusers' Euler scheduler with a fixed shift. Settings that change its sigmas or
steps in other ways (dynamic shifting, a terminal shift, Karras/exponential/beta sigmas, inverted
sigmas, stochastic sampling) are refused with the key named; so is another scheduler class. The
dynamic-shifting parameters (base_shift, max_shift, base_image_seq_len, max_image_seq_len,
time_shift_type) are ignored, since diffusers reads them only with use_dynamic_shifting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler

from ladd_ds.core.errors import InputError
from ladd_ds.models.registry import is_folder

MODEL_INFO = "ladd_model.json"  # in a teacher folder without vae/: {"codec": ..., "shift": ...}
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
DEFAULT_SHIFT = 3.0  # the released SD3 models' scheduler_config.json (SD3 medium, 3.5 large)
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Read only by diffusers' dynamic shifting, which is refused: their values do not matter.
_DYNAMIC_ONLY = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")


@dataclass(frozen=True)
class SamplerSettings:
    shift: float = DEFAULT_SHIFT
    num_train_timesteps: int = 1000


def scheduler_settings(path: Path) -> SamplerSettings:
    """The settings of a diffusers scheduler_config.json; InputError for what the sampler cannot follow."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the scheduler config ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a scheduler config is a JSON object of settings")
    name = raw.get("_class_name", SCHEDULER_CLASS)
    if name != SCHEDULER_CLASS:
        raise InputError(f"{path}: _class_name {name!r}; the teacher's sampler is diffusers' {SCHEDULER_CLASS}")
    defaults = dict(FlowMatchEulerDiscreteScheduler().config)
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in defaults)
    if unknown:
        raise InputError(f"{path}: unknown scheduler settings {unknown} (not in diffusers' {SCHEDULER_CLASS})")
    fixed = [k for k in defaults if k not in ("shift", "num_train_timesteps", *_DYNAMIC_ONLY)]
    changed = {k: raw[k] for k in fixed if k in raw and raw[k] != defaults[k]}
    if changed:
        wanted = {k: defaults[k] for k in changed}
        raise InputError(
            f"{path}: {changed}: the teacher's sampler supports only a fixed shift "
            f"(keys shift, num_train_timesteps); set them to {wanted} or remove them"
        )
    shift = float(raw.get("shift", defaults["shift"]))
    steps = raw.get("num_train_timesteps", defaults["num_train_timesteps"])
    if not shift > 0 or not isinstance(steps, int) or steps < 1:
        raise InputError(f"{path}: shift must be > 0 and num_train_timesteps a positive integer, got {shift}, {steps}")
    return SamplerSettings(shift=shift, num_train_timesteps=steps)


def folder_sampler_settings(folder: Path, info: dict) -> SamplerSettings:
    """The settings of a model folder whose ladd_model.json holds `info` ({} without one)."""
    scheduler = Path(folder) / SCHEDULER_CONFIG
    if not scheduler.is_file():
        return SamplerSettings(shift=float(info.get("shift", DEFAULT_SHIFT)))
    settings = scheduler_settings(scheduler)
    if "shift" in info and float(info["shift"]) != settings.shift:
        raise InputError(
            f"{folder}: {MODEL_INFO} says shift {info['shift']}, {SCHEDULER_CONFIG} says {settings.shift}; remove one of them"
        )
    return settings


def model_sampler_settings(spec: str) -> SamplerSettings:
    """The settings of model.teacher `spec`: a folder's (see the module docstring), a preset's default."""
    if not is_folder(spec):
        return SamplerSettings()
    info_file = Path(spec) / MODEL_INFO
    return folder_sampler_settings(Path(spec), json.loads(info_file.read_text()) if info_file.is_file() else {})
