"""One precision -> dtype map (ladd_ds/core/precision.py) behind the config, the CLI flags and the
exports; an unknown precision is an error that names where it came from."""

import re
import typing
from pathlib import Path

import pytest
import torch

from ladd_ds.config import DeepSpeedConfig
from ladd_ds.core.errors import InputError
from ladd_ds.core.precision import PRECISIONS, dtype_of

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_has_its_dtype(precision):
    dtype = dtype_of(precision)
    bits = torch.finfo(dtype).bits
    assert precision == f"{'bf' if dtype == torch.bfloat16 else 'fp'}{bits}"


def test_an_unknown_precision_names_its_key():
    with pytest.raises(InputError, match=r"deepspeed.precision: must be one of \['fp32', 'bf16'\], got 'fp16'"):
        dtype_of("fp16", key="deepspeed.precision")


def test_the_config_accepts_exactly_the_mapped_precisions():
    hints = typing.get_type_hints(DeepSpeedConfig)
    assert set(typing.get_args(hints["precision"])) == set(PRECISIONS)


def test_no_other_module_maps_a_precision_to_a_dtype():
    """The ways it was done before: a conditional on "bf16", or a dict from the name to a dtype."""
    own = re.compile(r'torch\.(bfloat16|float32) if .*precision|"(bf16|fp32)": torch\.(bfloat16|float32)')
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for root in ("ladd_ds", "evaluation")
        for path in sorted((REPO / root).rglob("*.py"))
        if path != REPO / "ladd_ds/core/precision.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if own.search(line)
    ]
    assert not found, f"use ladd_ds.core.precision.dtype_of: {found}"
