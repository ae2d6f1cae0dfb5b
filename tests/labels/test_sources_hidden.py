"""A student's label sources with the teacher's hidden states (``distill.loss: hint``): streamed
or read from a cache that holds them, checked and pinned on the driver, refused (one clear error)
from a cache without them or with several teachers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.labels.sources import CachedTeacher, open_label_source
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, check_cache_hidden, resolve_teachers
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.server import TeacherServer
from stkd_dist.serving.teacher import Teacher


def _resolve(direct: Teacher, teachers: tuple[TeacherSpec, ...]) -> tuple[TeacherSpec, ...]:
    return resolve_teachers(
        teachers,
        fingerprint=direct.meta.fingerprint,
        window_shape=direct.meta.window_shape,
        windows=direct.meta.splits["train"],
        hidden=True,
    )


def test_streamed_and_cached_hidden_states_are_the_teachers(
    server_factory: Callable[..., TeacherServer], direct: Teacher, tmp_path: Path
) -> None:
    server = server_factory()
    cache = precompute_labels(direct, tmp_path / "h.zarr", ["train"], hidden=True)
    stream = _resolve(direct, (TeacherSpec("stream", server.address),))
    cached = _resolve(direct, (TeacherSpec("cache", str(cache.path)),))
    assert stream[0].hidden_dim == cached[0].hidden_dim == 8  # pinned on the driver
    windows = np.asarray(direct.meta.splits["train"])[40:80]
    index = torch.from_numpy(windows)
    valid = torch.ones(len(windows), dtype=torch.bool)
    valid[-3:] = False  # padding samples: zeros
    ref = direct.predict(windows, hidden=True).hidden
    assert ref is not None
    got = []
    for teachers, in_memory in ((stream, False), (cached, False), (cached, True)):
        spec = LabelSpec(teachers, direct.meta.fingerprint, hidden=True, in_memory=in_memory)
        assert spec.hidden_dim == 8
        source = open_label_source(spec)
        source.begin_epoch(windows)
        labels = source.labels_for(index, valid)
        source.end_epoch()
        source.close()
        assert labels.hidden is not None and labels.hidden.shape == (40, 5, 8)  # [B, N, F_t]
        assert labels.spread is None  # not asked for
        assert not labels.hidden[~valid].any()
        got.append(labels.hidden[valid].numpy())
    for g in got:
        assert np.array_equal(g, ref[:-3])


def test_a_cache_without_hidden_states_is_refused_naming_the_loss(
    direct: Teacher, tmp_path: Path
) -> None:
    cache = precompute_labels(direct, tmp_path / "p.zarr", ["train"])
    teacher = TeacherSpec("cache", str(cache.path))
    for check in (
        lambda: _resolve(direct, (teacher,)),
        lambda: check_cache_hidden((teacher,)),
        lambda: CachedTeacher(teacher, LabelSpec((teacher,), direct.meta.fingerprint, hidden=True)),
    ):
        with pytest.raises(StoreError) as info:
            check()
        message = info.value.message
        assert message.startswith("distill.loss: hint needs the teacher's hidden states")
        assert "stkd precompute-labels --hidden" in message and "serve.mode: stream" in message
        assert info.value.where == teacher.name


def test_hidden_states_of_several_teachers_are_refused(direct: Teacher) -> None:
    teachers = (TeacherSpec("cache", "a", version="v1"), TeacherSpec("cache", "b", version="v2"))
    with pytest.raises(ConfigError, match="one teacher's hidden states") as info:
        LabelSpec(teachers, direct.meta.fingerprint, hidden=True)
    assert info.value.where == "distill.loss"
    assert LabelSpec(teachers, direct.meta.fingerprint).hidden_dim == 0
