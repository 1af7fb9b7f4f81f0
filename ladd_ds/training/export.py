"""Export a trained student as a diffusers folder (and the heads), from a training checkpoint.

`ladd-ds export --run RUN_DIR [--step N] [--ema] --out DIR` writes
  DIR/transformer/            config.json + safetensors, loadable with
                              SD3Transformer2DModel.from_pretrained(DIR, subfolder="transformer")
  DIR/discriminator/          heads.safetensors + config.json (architecture and taps)
  DIR/ladd_export.json        where it came from (run, step, EMA or not) and what sampling
                              needs (text encoders, latent codec: see ladd_ds.sampling)
on one CPU process, whatever the world size of the run. The folder appears atomically.
`--lora DIR` merges a LoRA (e.g. from a DPO run) into the exported student: the paper's recipe
applies the teacher's DPO LoRA to the LADD student.

A `ladd-ds dpo` run exports instead (see `export_dpo_run`)
  DIR/lora/                   the adapter (LoRA mode): ladd_ds.dpo.lora's folder format
  DIR/transformer/ + the rest of model.teacher's folder (text encoders, vae/, ladd_model.json):
                              the fine-tuned model as a complete SD3-style folder, usable as
                              model.teacher of a LADD run (full mode, or LoRA mode with --merge)
  DIR/ladd_dpo.json           where it came from
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from ladd_ds.config import load_config
from ladd_ds.distributed.engines import consolidate_zero_checkpoint
from ladd_ds.dpo.lora import load_lora
from ladd_ds.ema import gather_full_shadow
from ladd_ds.models.registry import resolve_model_config
from ladd_ds.training import checkpoint as ckpt
from ladd_ds.training.build import resolve_taps

STUDENT_PREFIX = "transformer."  # FlowModel wraps the diffusers transformer as `.transformer`


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = dict(ckpt.complete_checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under checkpoints/ (train first, or check --run)")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint for step {step} (available: {sorted(found)})")
    return found[step]


def gather_ema(checkpoint: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every trained parameter replaced by its EMA from the shards in rank-XXXXX.pt."""
    states = ckpt.read_rank_states(checkpoint)
    if any("ema" not in s for s in states):
        raise ValueError(f"{checkpoint} holds no EMA (the run had optim.ema_decay = 0); export without --ema")
    shadows = [s["ema"]["shadow"] for s in states]
    out = dict(state)  # buffers (e.g. the positional embedding) have no EMA
    out.update(gather_full_shadow(shadows, {k: v.shape for k, v in state.items()}))
    return out


def _spec(spec: str) -> str:
    """A model/codec spec as an absolute path when it names a folder, so the export can be used
    from anywhere."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def sampling_info(cfg) -> dict:
    """What `ladd-ds sample` needs besides the weights: the text encoders and latent codec the
    training data were made with, and the student's trained input times."""
    s = cfg.synth
    return {
        "teacher": _spec(cfg.model.teacher),
        "text_encoders": _spec(s.text_encoders),
        "drop_t5": s.drop_t5,
        "max_sequence_length": s.max_sequence_length,
        "seed": s.seed,
        "codec": _spec(s.vae),
        "student_timesteps": list(cfg.ladd.student_timesteps),
        "default_size": list(s.buckets[0]),  # [height, width] for `ladd-ds sample` without --size
    }


def _build_transformer(spec: str, state: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    """An SD3 transformer of `spec`'s architecture holding `state` (no weights are initialized)."""
    model_config = resolve_model_config(spec)
    model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(model_config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _temporary(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_run(
    run_dir: Path, out: Path, step: int | None = None, ema: bool = False, lora: str | None = None, merge: bool = False
) -> Path:
    """Export a LADD run (student + heads, `lora` merged into the student if given) or a DPO run
    (`merge`: also write the model with its LoRA folded in)."""
    run_dir, out = Path(run_dir), Path(out)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a ladd-ds run directory?")
    cfg = load_config(config_file)
    checkpoint = find_checkpoint(run_dir, step)
    kind = ckpt.read_trainer_state(checkpoint).get("trainer", "ladd")
    if kind == "dpo":
        if ema or lora:
            raise ValueError(f"{run_dir} is a DPO run: --ema and --lora apply to LADD runs only")
        return export_dpo_run(run_dir, cfg, checkpoint, out, merge)
    if merge:
        raise ValueError("--merge applies to DPO runs; to fold a LoRA into a LADD student use --lora DIR")
    state = consolidate_zero_checkpoint(checkpoint, "student")
    student = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    if ema:
        student = {k[len(STUDENT_PREFIX) :]: v for k, v in gather_ema(checkpoint, state).items()}

    model = _build_transformer(cfg.model.student or cfg.model.teacher, student)
    if lora is not None:
        load_lora(model, lora, merge=True)

    tmp = _temporary(out)
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    heads = consolidate_zero_checkpoint(checkpoint, "heads")
    (tmp / "discriminator").mkdir()
    save_file({k: v.contiguous() for k, v in heads.items()}, tmp / "discriminator" / "heads.safetensors")
    teacher_config = resolve_model_config(cfg.model.teacher)
    heads_config = {
        "feature_dim": teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"],
        "num_heads": len(resolve_taps(cfg.discriminator.taps, teacher_config["num_layers"])),
        "pooled_dim": teacher_config["pooled_projection_dim"],
        "hidden": cfg.discriminator.hidden_channels,
        "num_layers": cfg.discriminator.num_layers,
        "taps": resolve_taps(cfg.discriminator.taps, teacher_config["num_layers"]),
    }
    (tmp / "discriminator" / "config.json").write_text(json.dumps(heads_config, indent=2))
    info = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint.name,
        "step": int(checkpoint.name.split("-")[1]),
        "ema": ema,
        "lora_merged": str(Path(lora).resolve()) if lora else None,
        "sampling": sampling_info(cfg),
    }
    (tmp / "ladd_export.json").write_text(json.dumps(info, indent=2))
    return _commit(tmp, out)


def export_dpo_run(run_dir: Path, cfg, checkpoint: Path, out: Path, merge: bool = False) -> Path:
    from ladd_ds.dpo.lora import lora_config_from, lora_state_dict, save_lora
    from ladd_ds.models.registry import is_folder

    state = consolidate_zero_checkpoint(checkpoint, "model")
    state = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    tmp = _temporary(out)
    lora_mode = cfg.dpo.mode == "lora"
    if lora_mode:
        save_lora(tmp / "lora", lora_state_dict(state), lora_config_from(cfg.dpo.lora))
    if merge or not lora_mode:
        if lora_mode:  # peft's wrapped layers keep the frozen weight as `<layer>.base_layer.weight`
            base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
            model = _build_transformer(cfg.model.teacher, base)
            load_lora(model, tmp / "lora", merge=True)
        else:
            model = _build_transformer(cfg.model.teacher, state)
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        if is_folder(cfg.model.teacher):  # the rest of the SD3 folder: text encoders, vae/, ladd_model.json
            for item in Path(cfg.model.teacher).iterdir():
                if item.name != "transformer":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    info = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint.name,
        "step": int(checkpoint.name.split("-")[1]),
        "mode": cfg.dpo.mode,
        "model": _spec(cfg.model.teacher),
        "lora": "lora" if lora_mode else None,
        "merged": bool(merge or not lora_mode),
    }
    (tmp / "ladd_dpo.json").write_text(json.dumps(info, indent=2))
    return _commit(tmp, out)
