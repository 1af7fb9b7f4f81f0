import pytest

from ladd_ds.ladd.build import resolve_taps


def test_taps_default_to_every_block_and_are_checked():
    assert resolve_taps(None, 3) == [0, 1, 2]
    assert resolve_taps([2, 0], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"blocks \[3\] do not exist \(the teacher has 3 blocks"):
        resolve_taps([3], 3)
