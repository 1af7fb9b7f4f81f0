"""Export a `ladd-ds dpo` run (`ladd-ds export --run DPO_RUN --out DIR [--merge] [--dtype] [--shard-size]`):
DIR/lora/                   the adapter (LoRA mode, fp32): ladd_ds.models.lora's folder format
DIR/transformer/ + the rest of model.teacher's folder (text encoders, vae/, ladd_model.json):
                            the fine-tuned model as a complete SD3-style folder in --dtype, sharded
                            as a LADD student's export (ladd_ds.models.sharded), usable as
                            model.teacher of a LADD run (full mode, or LoRA mode with --merge)
DIR/ladd_dpo.json           where it came from
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ladd_ds.config import Config
from ladd_ds.core.files import atomic_directory
from ladd_ds.models.lora import lora_config_from, lora_state_dict, merged_sources, save_lora
from ladd_ds.models.registry import is_folder, resolve_model_config
from ladd_ds.models.sharded import DEFAULT_SHARD_BYTES
from ladd_ds.training.export import absolute_spec, checkpoint_info, export_source, transformer_sources, write_transformer


def export_dpo_run(
    run_dir: Path,
    out: Path,
    *,
    cfg: Config,
    checkpoint: Path,
    merge: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """The LoRA (LoRA mode) and/or the fine-tuned model as an SD3 folder in `dtype` (`merge`, or
    full mode)."""
    sources = transformer_sources(checkpoint, "model")
    with atomic_directory(out, "export", source=export_source(run_dir), overwrite=overwrite) as tmp:
        _write_dpo_export(tmp, sources, cfg, run_dir, checkpoint, merge, dtype, shard_size)
    return Path(out)


def _write_dpo_export(
    tmp: Path, sources: dict, cfg: Config, run_dir: Path, checkpoint: Path, merge: bool, dtype, shard_size
) -> None:
    lora_mode = cfg.dpo.mode == "lora"
    if lora_mode:
        adapters = {k: v() for k, v in sources.items() if ".lora_" in k}  # small: read them whole
        save_lora(tmp / "lora", lora_state_dict(adapters), lora_config_from(cfg.dpo.lora))
    if merge or not lora_mode:
        if lora_mode:  # peft's wrapped layers keep the frozen weight as `<layer>.base_layer.weight`
            base = {k.replace(".base_layer.", "."): v for k, v in sources.items() if ".lora_" not in k}
            sources = merged_sources(base, tmp / "lora")
        write_transformer(tmp / "transformer", resolve_model_config(cfg.model.teacher), sources, dtype, shard_size)
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
        "dtype": str(dtype).removeprefix("torch.") if merge or not lora_mode else None,
    }
    (tmp / "ladd_dpo.json").write_text(json.dumps(info, indent=2))
