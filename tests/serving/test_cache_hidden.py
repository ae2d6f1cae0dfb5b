"""The label cache with the teacher's hidden states: created with them (``hidden_dim``), filled
by precompute and write-through, read back bitwise; caches without them (and old ones) read as
none, and asking them for hidden states is one clear error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from stkd_dist.errors import StoreError
from stkd_dist.serving.cache import LabelCache, open_cache
from stkd_dist.serving.client import SoftLabelClient
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.server import TeacherServer
from stkd_dist.serving.teacher import Teacher


@pytest.fixture(scope="module")
def reference(direct: Teacher) -> LabelArrays:
    """The live teacher's labels and hidden states of every training window."""
    return direct.predict(np.asarray(direct.meta.splits["train"]), hidden=True)


def _hidden(labels: LabelArrays | None) -> np.ndarray:
    assert labels is not None and labels.hidden is not None
    return labels.hidden


def test_precompute_stores_hidden_states_bitwise(
    direct: Teacher, reference: LabelArrays, tmp_path: Path
) -> None:
    cache = precompute_labels(direct, tmp_path / "h.zarr", ["train"], hidden=True, workers=2)
    assert cache.hidden_dim == 8 == dict(cache.group.attrs)["hidden_dim"]
    train = cache.group["train"]
    assert train["hidden"].shape == (len(direct.meta.splits["train"]), 5, 8)  # [windows, N, F]
    # chunked like the prediction: the same rows per chunk as a cache without hidden states
    plain = precompute_labels(direct, tmp_path / "p.zarr", ["train"])
    assert train["hidden"].chunks[0] == train["prediction"].chunks[0] == plain.chunk_rows("train")
    got = LabelCache(cache.path).read_split("train", with_hidden=True)
    assert np.array_equal(_hidden(got), _hidden(reference))
    assert np.array_equal(got.prediction, reference.prediction)
    assert np.array_equal(got.prediction, plain.read_split("train").prediction)
    # a lookup of shuffled windows, from chunks and from the resident copy
    windows = np.asarray(direct.meta.splits["train"])[[300, 7, 8, 150]]
    for reader in (LabelCache(cache.path), LabelCache(cache.path, memory_bytes=2**30)):
        hit, labels = reader.lookup("train", windows, with_hidden=True)
        assert hit.all() and np.array_equal(_hidden(labels), _hidden(reference)[[300, 7, 8, 150]])
        _, without = reader.lookup("train", windows)
        assert without is not None and without.hidden is None  # only when asked for


def test_a_cache_without_hidden_states_says_what_to_do(direct: Teacher, tmp_path: Path) -> None:
    cache = precompute_labels(direct, tmp_path / "p.zarr", ["train"])
    assert cache.hidden_dim == 0
    with pytest.raises(StoreError, match=r"precompute-labels --hidden") as info:
        cache.lookup("train", np.arange(4), with_hidden=True)
    assert info.value.where == str(cache.path)
    with pytest.raises(StoreError, match="no hidden states"):
        cache.read_split("train", with_hidden=True)
    # a cache written before hidden states existed has no hidden_dim attribute: none
    group = zarr.open_group(str(cache.path), mode="r+")
    del group.attrs["hidden_dim"]
    assert LabelCache(cache.path).hidden_dim == 0


def test_writes_to_a_cache_with_hidden_states_must_bring_them(
    direct: Teacher, reference: LabelArrays, tmp_path: Path
) -> None:
    cache = LabelCache.create(tmp_path / "w.zarr", direct.meta, ["train"], hidden=True)
    idx = np.arange(5)
    with pytest.raises(StoreError, match="got no hidden"):
        spread = np.zeros_like(reference.prediction[:5])
        cache.write(idx, LabelArrays(reference.prediction[:5], spread))
    # fragments (a chunk not complete yet) carry the hidden rows; another reader merges them
    assert cache.write(idx, direct.predict(idx, hidden=True)) == 5
    reader = LabelCache(cache.path)
    hit, labels = reader.lookup("train", np.arange(8), with_hidden=True)
    assert hit.tolist() == [True] * 5 + [False] * 3
    assert np.array_equal(_hidden(labels), _hidden(reference)[:5])


def test_write_through_fills_the_hidden_states_and_serves_them_after(
    server_factory: Callable[..., TeacherServer],
    teacher_env,
    direct: Teacher,
    reference: LabelArrays,
    tmp_path: Path,
) -> None:
    path = tmp_path / "wt.zarr"
    cache = open_cache(path, direct.meta, writable=True, hidden=True)
    server = server_factory(cache=cache, write_through=True)
    windows = list(range(0, 120, 2))
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        list(c.stream("train", windows))  # a request WITHOUT hidden states
    server.flush_cache()
    # the cache stores them anyway: its server computed them for every window it stores
    hit, labels = LabelCache(path).lookup("train", np.asarray(windows), with_hidden=True)
    assert hit.all() and np.array_equal(_hidden(labels), _hidden(reference)[windows])
    # a fresh server on the filled cache serves hidden states without running the teacher
    again = server_factory(cache=LabelCache(path))
    with SoftLabelClient([again.address], expected_fingerprint=teacher_env.fingerprint) as c:
        items = list(c.stream("train", windows, hidden=True))
    got = np.concatenate([lab.hidden for _, lab in items if lab.hidden is not None])
    assert np.array_equal(got, _hidden(reference)[windows])
    assert again.teacher.forward_windows == 0


def test_a_server_on_a_cache_without_hidden_states_computes_them(
    server_factory: Callable[..., TeacherServer],
    teacher_env,
    direct: Teacher,
    reference: LabelArrays,
    tmp_path: Path,
) -> None:
    cache = precompute_labels(direct, tmp_path / "p.zarr", ["train"])
    server = server_factory(cache=LabelCache(cache.path))
    windows = list(range(10, 50))
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        plain = list(c.stream("train", windows))
        assert server.teacher.forward_windows == 0  # from the cache
        with_hidden = list(c.stream("train", windows, hidden=True))
    assert server.teacher.forward_windows == len(windows)  # computed: the cache has none
    got = np.concatenate([lab.hidden for _, lab in with_hidden if lab.hidden is not None])
    assert np.array_equal(got, _hidden(reference)[windows])
    pred = np.concatenate([lab.prediction for _, lab in plain])
    assert np.array_equal(pred, np.concatenate([lab.prediction for _, lab in with_hidden]))


def test_the_pipelines_label_cache_gets_the_hidden_states_a_hint_student_needs(
    teacher_env, tmp_path: Path
) -> None:
    from stkd_dist.pipeline.stages import ensure_label_cache

    dest = tmp_path / "run-labels.zarr"
    args = (teacher_env.checkpoint, teacher_env.store, dest, ["train"])
    assert ensure_label_cache(*args).computed and LabelCache(dest).hidden_dim == 0
    assert not ensure_label_cache(*args).computed  # complete: reused
    # a hint student needs the hidden states: the cache without them is made again, with them
    assert ensure_label_cache(*args, hidden=True).computed
    assert LabelCache(dest).hidden_dim == 8
    assert not ensure_label_cache(*args, hidden=True).computed
    assert not ensure_label_cache(*args).computed  # more than asked for is fine
