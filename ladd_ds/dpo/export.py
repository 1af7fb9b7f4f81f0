"""Export a `ladd-ds dpo` run (`ladd-ds export --run DPO_RUN --out DIR [--merge]`):
DIR/lora/                   the adapter (LoRA mode): ladd_ds.models.lora's folder format
DIR/transformer/ + the rest of model.teacher's folder (text encoders, vae/, ladd_model.json):
                            the fine-tuned model as a complete SD3-style folder, usable as
                            model.teacher of a LADD run (full mode, or LoRA mode with --merge)
DIR/ladd_dpo.json           where it came from
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ladd_ds.config import Config
from ladd_ds.core.files import atomic_directory
from ladd_ds.models.lora import load_lora, lora_config_from, lora_state_dict, save_lora
from ladd_ds.models.registry import is_folder
from ladd_ds.training.export import absolute_spec, build_transformer_from_state, checkpoint_info, consolidated_transformer


def export_dpo_run(run_dir: Path, out: Path, cfg: Config, checkpoint: Path, merge: bool = False) -> Path:
    """The LoRA (LoRA mode) and/or the fine-tuned model as an SD3 folder (`merge`, or full mode)."""
    state = consolidated_transformer(checkpoint, "model")
    with atomic_directory(out) as tmp:
        _write_dpo_export(tmp, state, cfg, run_dir, checkpoint, merge)
    return Path(out)


def _write_dpo_export(tmp: Path, state: dict, cfg: Config, run_dir: Path, checkpoint: Path, merge: bool) -> None:
    lora_mode = cfg.dpo.mode == "lora"
    if lora_mode:
        save_lora(tmp / "lora", lora_state_dict(state), lora_config_from(cfg.dpo.lora))
    if merge or not lora_mode:
        if lora_mode:  # peft's wrapped layers keep the frozen weight as `<layer>.base_layer.weight`
            base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
            model = build_transformer_from_state(cfg.model.teacher, base)
            load_lora(model, tmp / "lora", merge=True)
        else:
            model = build_transformer_from_state(cfg.model.teacher, state)
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        if is_folder(cfg.model.teacher):  # the rest of the SD3 folder: text encoders, vae/, ladd_model.json
            for item in Path(cfg.model.teacher).iterdir():
                if item.name != "transformer":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    info = {
        **checkpoint_info(run_dir, checkpoint),
        "mode": cfg.dpo.mode,
        "model": absolute_spec(cfg.model.teacher),
        "lora": "lora" if lora_mode else None,
        "merged": bool(merge or not lora_mode),
    }
    (tmp / "ladd_dpo.json").write_text(json.dumps(info, indent=2))
