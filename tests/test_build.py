import pytest

from ladd_ds.ladd.build import resolve_taps
from ladd_ds.training.build import memory_plan


def test_memory_plan_follows_zero_sharding():
    # bf16 trained model on 4 ranks: 2 B weights, 4 B grads, 8 + 4 B optimizer per parameter.
    assert memory_plan(1000, True, "bf16", 3, 4) == {"weights": 500, "grads": 1000, "optimizer": 3000}
    assert memory_plan(1000, True, "bf16", 2, 4) == {"weights": 2000, "grads": 1000, "optimizer": 3000}
    assert memory_plan(1000, True, "fp32", 1, 4) == {"weights": 4000, "grads": 4000, "optimizer": 2000}
    assert memory_plan(1000, True, "fp32", 0, 4) == {"weights": 4000, "grads": 4000, "optimizer": 8000}
    assert memory_plan(1000, False, "bf16", 3, 4) == {"weights": 500, "grads": 0, "optimizer": 0}


def test_taps_default_to_every_block_and_are_checked():
    assert resolve_taps(None, 3) == [0, 1, 2]
    assert resolve_taps([2, 0], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"blocks \[3\] do not exist \(the teacher has 3 blocks"):
        resolve_taps([3], 3)
