"""Model registries: keys, roles, unknown keys / kwargs and duplicates."""

from __future__ import annotations

import pytest
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models import MODELS, STUDENTS, TEACHERS, build_forecaster, build_network
from stkd_dist.models.registry import ModelLookup
from stkd_dist.registry import Registry

DIMS = DataDims(nodes=4, input_steps=6, horizon=3, in_channels=1, out_channels=1)


def test_builtin_keys_and_roles() -> None:
    assert {"lstm", "stgnn"} <= set(TEACHERS.keys())
    assert {"mlp", "lstm_small", "linear"} <= set(STUDENTS.keys())
    assert not set(TEACHERS.keys()) & set(STUDENTS.keys())
    assert MODELS.role("stgnn") == "teacher"
    assert MODELS.role("mlp") == "student"
    assert set(MODELS.keys()) == set(TEACHERS.keys()) | set(STUDENTS.keys())
    assert "lstm_small" in MODELS and "nope" not in MODELS


def test_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'stgn'"):
        build_network("stgn", DIMS)


@pytest.mark.parametrize("key", ["lstm", "stgnn", "mlp", "lstm_small", "linear"])
def test_unknown_kwarg_raises(key: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown argument.*hidden_sizes"):
        build_forecaster(key, DIMS, hidden_sizes=3)


def test_reserved_kwarg_raises() -> None:
    with pytest.raises(ConfigError, match="not a hyper-parameter"):
        build_network("mlp", DIMS, **{"dims": DIMS})


def test_duplicate_key_raises() -> None:
    with pytest.raises(ValueError, match="duplicate student model key 'mlp'"):
        STUDENTS.register("mlp")(nn.Identity)


def test_key_in_both_registries_is_rejected() -> None:
    teachers: Registry[nn.Module] = Registry("teacher model")
    students: Registry[nn.Module] = Registry("student model")
    teachers.register("same")(nn.Identity)
    students.register("same")(nn.Identity)
    lookup = ModelLookup(teachers, students)
    with pytest.raises(ConfigError, match="both teacher model and student model"):
        lookup.get("same")
