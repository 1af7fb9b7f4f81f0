"""ladd_ds.methods.method_for: the command picks the method family, ladd.task LADD's variant; each
method class trains only the tasks it names, and each concrete method has its own dry run."""

import pytest

from ladd_ds.config import load_config
from ladd_ds.dpo.method import DPOMethod
from ladd_ds.ladd.method import ConditionedLADDMethod, LADDMethod
from ladd_ds.methods import method_for
from ladd_ds.training.method import Method
from tests.conftest import TINY_CONFIG


@pytest.mark.parametrize(
    "command, task, expected",
    [("train", "t2i", LADDMethod), ("train", "inpaint", ConditionedLADDMethod), ("train", "edit", ConditionedLADDMethod)]
    + [("dpo", "t2i", DPOMethod)],
)
def test_method_for_picks_the_class_by_command_and_task(command, task, expected):
    assert method_for(load_config(TINY_CONFIG, [f"ladd.task={task}"]), command) is expected


def test_method_for_refuses_an_unknown_command():
    with pytest.raises(ValueError, match="'export'"):
        method_for(load_config(TINY_CONFIG), "export")


@pytest.mark.parametrize("method, task", [(LADDMethod, "inpaint"), (ConditionedLADDMethod, "t2i")])
def test_a_ladd_class_refuses_a_task_it_does_not_train(method, task):
    with pytest.raises(ValueError, match=f"ladd.task={task}: {method.__name__}"):
        method.check_config(load_config(TINY_CONFIG, [f"ladd.task={task}"]))


@pytest.mark.parametrize("method", [LADDMethod, ConditionedLADDMethod, DPOMethod])
def test_every_method_has_its_own_dry_run(method):
    assert method.dry_run.__func__ is not Method.dry_run.__func__
