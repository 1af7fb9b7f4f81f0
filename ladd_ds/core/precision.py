"""Precision names -> torch dtypes: the one map behind `deepspeed.precision`, `ladd-ds sample
--precision` and `ladd-ds export --dtype` (and the stored text columns, data/schema.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ladd_ds.core.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16")  # what the config, the CLI flags and the exports accept


def dtype_of(precision: str, *, key: str = "precision") -> torch.dtype:
    """The torch dtype of a precision name; an unknown name is an InputError that names `key`
    (the config key or flag it came from)."""
    # torch imported here, not at the top: cli.py reads PRECISIONS for its flags, and `ladd-ds
    # --help` stays free of the torch import (1.8 s of CPU time on the 2-core test machine).
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise InputError(f"{key}: must be one of {list(PRECISIONS)}, got {precision!r}")
    return dtypes[precision]
