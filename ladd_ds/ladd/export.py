"""Export a trained student as a diffusers folder (and the heads), from a training checkpoint.

`ladd-ds export --run RUN_DIR [--step N] [--ema] [--dtype bf16|fp32] [--shard-size 5GB] --out DIR`
writes
  DIR/transformer/            config.json + safetensors in --dtype (bf16 by default), sharded with
                              an index when larger than --shard-size (ladd_ds.models.sharded),
                              loadable with SD3Transformer2DModel.from_pretrained(DIR,
                              subfolder="transformer", torch_dtype=...)
  DIR/discriminator/          heads.safetensors (fp32 whatever --dtype: the heads are small and
                              kept exact for continued training) + config.json (architecture, taps)
  DIR/ladd_export.json        where it came from (run, step, EMA or not) and what sampling
                              needs (text encoders, latent codec: see ladd_ds.sampling)
on one CPU process, whatever the world size of the run, one tensor at a time (the student is never
held whole in memory). The folder appears atomically.
`--lora DIR` merges a LoRA (e.g. from a DPO run) into the exported student: the paper's recipe
applies the teacher's DPO LoRA to the LADD student.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ladd_ds.config import Config
from ladd_ds.core.files import atomic_directory
from ladd_ds.distributed.engines import consolidate_zero_checkpoint
from ladd_ds.ladd.build import resolve_taps
from ladd_ds.models.lora import merged_sources
from ladd_ds.models.registry import resolve_model_config, task_model_config
from ladd_ds.models.sharded import DEFAULT_SHARD_BYTES
from ladd_ds.sampling import TrainedTimes
from ladd_ds.training.export import (
    absolute_spec,
    checkpoint_info,
    ema_sources,
    export_source,
    transformer_sources,
    write_transformer,
)


def sampling_info(cfg) -> dict:
    """What `ladd-ds sample` needs besides the weights: the text encoders and latent codec the
    training data were made with, and the student's trained input times and their probabilities."""
    t = cfg.text
    return {
        "teacher": absolute_spec(cfg.model.teacher),
        "text_encoders": absolute_spec(t.encoders),
        "drop_t5": t.drop_t5,
        "max_sequence_length": t.max_sequence_length,
        "text_seed": t.seed,
        "codec": absolute_spec(cfg.codec.vae),
        "codec_seed": cfg.codec.seed,
        # The trained times and how often each was drawn: `sample --steps` refuses a schedule that
        # needs a time of probability 0 (sampling.student_schedule).
        **TrainedTimes.from_config(cfg.ladd).record(),
        "task": cfg.ladd.task,  # also readable from the transformer's channels (conditioning.model_task)
        "default_size": list(cfg.synth.buckets[0]),  # [height, width] for `ladd-ds sample` without --size
    }


def export_ladd_run(
    run_dir: Path,
    out: Path,
    *,
    cfg: Config,
    checkpoint: Path,
    ema: bool = False,
    lora: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """The student (its EMA with `ema`; `lora` merged in if given) in `dtype` and the heads of a
    LADD run."""
    run_dir, out = Path(run_dir), Path(out)
    config = task_model_config(cfg.model.student or cfg.model.teacher, cfg.ladd.task)
    student = transformer_sources(checkpoint, "student")
    if ema:
        student = ema_sources(checkpoint, student, config)
    if lora is not None:
        student = merged_sources(student, lora)
    with atomic_directory(out, "export", source=export_source(run_dir), overwrite=overwrite) as tmp:
        write_transformer(tmp / "transformer", config, student, dtype, shard_size)
        _write_ladd_export(tmp, checkpoint, cfg, run_dir, ema, lora, dtype)
    return out


def _write_ladd_export(tmp: Path, checkpoint: Path, cfg: Config, run_dir: Path, ema: bool, lora: str | None, dtype) -> None:
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
        **checkpoint_info(run_dir, checkpoint),
        "ema": ema,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_merged": str(Path(lora).resolve()) if lora else None,
        "sampling": sampling_info(cfg),
    }
    (tmp / "ladd_export.json").write_text(json.dumps(info, indent=2))
