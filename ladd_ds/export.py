"""`ladd-ds export`: a run's checkpoint exported by the exporter of the method that trained it
(the checkpoint records the method's name). The CLI, the demo and the tests call `export_run`;
it sits above both methods (ladd/, dpo/) so that each of them stays independent of the other."""

from __future__ import annotations

from pathlib import Path

from ladd_ds.core.errors import InputError
from ladd_ds.core.outputs import check_output
from ladd_ds.core.precision import dtype_of
from ladd_ds.dpo.export import export_dpo_run
from ladd_ds.ladd.export import export_ladd_run
from ladd_ds.models.sharded import parse_size
from ladd_ds.training.export import export_source, run_checkpoint


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    ema: bool = False,
    lora: str | None = None,
    merge: bool = False,
    dtype: str = "bf16",
    shard_size: str | int = "5GB",  # ladd_ds.models.sharded.DEFAULT_SHARD_SIZE
    overwrite: bool = False,
) -> Path:
    """Export a run's checkpoint with its method's exporter (the checkpoint records the method).
    The transformer is written in `dtype` ("bf16" or "fp32") as safetensors shards of at most
    `shard_size` ("5GB", "10MB", or bytes). `out` is replaced only when it holds an export of the
    same run, an export of another run only with `overwrite`; anything else is refused
    (ladd_ds.core.outputs), before any tensor is read."""

    torch_dtype, shard_bytes = dtype_of(dtype, key="--dtype"), parse_size(shard_size)
    cfg, checkpoint, kind = run_checkpoint(Path(run_dir), step)
    check_output(out, "export", source=export_source(run_dir), overwrite=overwrite)
    if kind == "dpo":
        if ema or lora:
            raise InputError(f"{run_dir} is a DPO run: --ema and --lora apply to LADD runs only")

        return export_dpo_run(
            Path(run_dir),
            Path(out),
            cfg=cfg,
            checkpoint=checkpoint,
            merge=merge,
            dtype=torch_dtype,
            shard_size=shard_bytes,
            overwrite=overwrite,
        )
    if merge:
        raise InputError("--merge applies to DPO runs; to fold a LoRA into a LADD student use --lora DIR")

    return export_ladd_run(
        Path(run_dir),
        Path(out),
        cfg=cfg,
        checkpoint=checkpoint,
        ema=ema,
        lora=lora,
        dtype=torch_dtype,
        shard_size=shard_bytes,
        overwrite=overwrite,
    )
