"""A store with one corrupted chunk: every read path names the store and that chunk in one
StoreError, and the CLI prints it as one line; a StoreError raised in a Ray worker reaches the
driver's CLI as the same line.

The chunk to corrupt is found from the array's own metadata (``values/zarr.json``: chunk shape and
key encoding), not from the code under test, and the bytes written are checked to be undecodable by
numcodecs before anything of stkd-dist reads them.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numcodecs
import numpy as np
import pytest

from stkd_dist.cli import carried_user_error, main
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import WindowSpec
from stkd_dist.errors import ConfigError, StkdError, StoreError
from stkd_dist.info import channel_statistics
from stkd_dist.storage import open_store
from stkd_dist.storage.chunks import _bounds, chunk_errors, read_array
from stkd_dist.testing import random_store

STEPS, CHUNK_STEPS = 200, 50
BAD_STEP = 170  # in the test split (train is steps [0, 140)): the training statistics are intact


def _chunk_file(store: Path, array: str, step: int) -> tuple[Path, str, int]:
    """The file of the chunk of ``array`` holding ``step``, its key and its time-chunk index,
    from the array's metadata."""
    meta = json.loads((store / array / "zarr.json").read_text())
    chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = meta["chunk_key_encoding"]
    assert encoding["name"] == "default"
    sep = encoding["configuration"]["separator"]
    index = (step // chunk_shape[0],) + (0,) * (len(chunk_shape) - 1)
    key = sep.join(["c", *map(str, index)])
    path = store / array / Path(*key.split(sep))
    assert path.is_file(), path
    return path, f"{array}/{key}", index[0]


def _corrupt(path: Path) -> None:
    """Overwrite 8 bytes of the zstd frame header (after the magic number: its descriptor then
    has a reserved bit set), and check that numcodecs cannot decode the chunk."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    data[4:12] = b"\x5a" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        numcodecs.Zstd().decode(bytes(data))


@pytest.fixture(params=["values", "mask"])
def corrupted(request, tmp_path):
    """``(store, key, time_chunk)``: a store whose ``values`` or ``mask`` chunk at BAD_STEP is
    corrupted."""
    store = random_store(tmp_path / "damaged.zarr", steps=STEPS, chunk_steps=CHUNK_STEPS)
    path, key, chunk = _chunk_file(store, request.param, BAD_STEP)
    _corrupt(path)
    return store, key, chunk


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("stkd: error: ")
    return lines[0]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_info_prints_one_line_naming_store_and_chunk(corrupted, capsys, json_flag):
    store, key, chunk = corrupted
    assert main(["info", str(store), *json_flag]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"stkd: error: {store}: ")
    assert f"key {key}" in line and f"chunk ({chunk}, 0, 0)" in line
    lo = chunk * CHUNK_STEPS
    assert f"time [{lo}, {lo + CHUNK_STEPS})" in line
    assert "corrupted" in line and line.endswith("re-ingest the dataset")


def test_reader_and_dask_paths_raise_the_same_store_error(corrupted):
    store_path, key, chunk = corrupted
    array = key.split("/")[0]
    store = open_store(store_path)
    store.read(0, chunk * CHUNK_STEPS)  # the chunks before it are intact

    with pytest.raises(StoreError) as e:
        store.read(BAD_STEP - 30, BAD_STEP + 1)
    assert e.value.where == str(store_path)
    assert e.value.message.startswith(f"cannot read steps [{BAD_STEP - 30}, {BAD_STEP + 1}): ")
    assert f"chunk ({chunk}, 0, 0) of array {array!r} (key {key}" in e.value.message
    assert e.value.message.endswith("re-ingest the dataset")
    assert "\n" not in str(e.value)

    reader = WindowReader(store, WindowSpec(input_steps=12, horizon=12))
    with pytest.raises(StoreError, match=f"key {key}") as r:
        reader.batch([BAD_STEP - 12])
    assert r.value.where == str(store_path)

    # the Dask arrays (statistics, fingerprint, stkd info) name it too, from inside the task
    with pytest.raises(StoreError, match=f"key {key}") as d:
        store.dask(array)[BAD_STEP].compute(scheduler="threads")
    assert d.value.where == str(store_path)
    with pytest.raises(StoreError, match=f"key {key}"):
        channel_statistics(store)


def test_corrupted_coordinate_is_named(tmp_path, capsys):
    """The time axis is read through xarray: its chunk is named as well."""
    store = random_store(tmp_path / "t.zarr", steps=STEPS, chunk_steps=CHUNK_STEPS)
    path, key, _ = _chunk_file(store, "time", 0)
    _corrupt(path)
    with pytest.raises(StoreError, match=f"chunk \\(0\\) of array 'time' \\(key {key}\\)"):
        _ = open_store(store).time
    assert main(["info", str(store)]) == 2
    assert f"key {key})" in _one_error_line(capsys)


def test_error_no_chunk_reproduces_is_not_called_corruption(tmp_path):
    store = open_store(random_store(tmp_path / "ok.zarr", steps=STEPS, chunk_steps=CHUNK_STEPS))
    # an error that no chunk of the selection reproduces propagates unchanged, not a StoreError
    with (
        pytest.raises(KeyError, match="not a chunk"),
        chunk_errors(store.values, store.where, slice(0, 60)),
    ):
        raise KeyError("not a chunk")
    np.testing.assert_array_equal(
        read_array(store.values, (slice(10, 20), 1), where=store.where),
        np.asarray(store.values[10:20, 1]),
    )


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Ellipsis, [(0, 200), (0, 6), (0, 2)]),
        (slice(40, 60), [(40, 60), (0, 6), (0, 2)]),
        ((5, Ellipsis, -1), [(5, 6), (0, 6), (1, 2)]),
        ((slice(None, None, 50), np.array([4, 1])), [(0, 151), (1, 5), (0, 2)]),
        (np.zeros(200, dtype=bool), [(0, 0), (0, 6), (0, 2)]),
    ],
)
def test_selection_bounds(selection, expected):
    assert _bounds(selection, (200, 6, 2)) == expected


# -- errors raised in Ray workers ----------------------------------------------------------------


def _worker_error() -> StoreError:
    return StoreError(
        "chunk (3, 0, 0) of array 'values' (key values/c/3/0/0) is corrupted and cannot be "
        "decoded (RuntimeError: x); re-ingest the dataset",
        where="s3://bucket/datasets/los.zarr",
    )


def test_store_error_pickles_with_its_fields():
    err = _worker_error()
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StoreError
    assert (back.where, back.message, str(back)) == (err.where, err.message, str(err))
    assert back.exit_code == 2


class _TaskError(StoreError):
    """Stands in for Ray's ``RayTaskError(StoreError)``: a StoreError whose text is the remote
    traceback, the original in ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Traceback (most recent call last):\n  ...\n{cause}")
        self.cause = cause


class _GroupError(Exception):
    """Stands in for Ray Train's ``WorkerGroupError``."""

    def __init__(self, worker_failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = worker_failures

    def __reduce__(self):
        return type(self), (self.worker_failures,)


def test_carried_user_error_unwraps_worker_failures():
    err = _worker_error()
    assert carried_user_error(err) is err
    assert carried_user_error(_TaskError(err)) is err
    group = pickle.loads(pickle.dumps(_GroupError({1: ConfigError("late", "x"), 0: err})))
    found = carried_user_error(group)
    assert type(found) is StoreError and str(found) == str(err)  # rank 0 first
    assert carried_user_error(_GroupError({0: RuntimeError("boom")})) is None
    try:
        raise RuntimeError("fit failed") from _TaskError(err)
    except RuntimeError as e:
        assert carried_user_error(e) is err


def test_stkd_error_raised_from_another_keeps_its_own_message():
    try:
        try:
            raise StoreError("no such store", where="x.zarr")
        except StoreError as inner:
            raise StoreError("incomplete store: re-ingest", where="x.zarr") from inner
    except StoreError as outer:
        assert carried_user_error(outer) is outer


def test_real_ray_wrappers_are_unwrapped():
    """Ray's own wrapper classes (constructed here; no cluster is started)."""
    exceptions = pytest.importorskip("ray.exceptions")
    err = _worker_error()
    try:
        raise err
    except StoreError:
        import traceback

        task = exceptions.RayTaskError("read", traceback.format_exc(), err).as_instanceof_cause()
    assert isinstance(task, StkdError) and str(err) != str(task)
    assert carried_user_error(task) is err
    v2 = pytest.importorskip("ray.train.v2.api.exceptions")
    group = pickle.loads(pickle.dumps(v2.WorkerGroupError("rank 0 failed", {0: err})))
    assert str(carried_user_error(group)) == str(err)
    assert str(carried_user_error(v2.ControllerError(err))) == str(err)


def test_cli_prints_a_wrapped_worker_error_as_one_line(tmp_path, capsys, monkeypatch):
    store = random_store(tmp_path / "ok.zarr", steps=STEPS, chunk_steps=CHUNK_STEPS)
    err = _worker_error()

    def fail(_store):
        raise _GroupError({0: _TaskError(err)})

    monkeypatch.setattr("stkd_dist.commands.info.dataset_info", fail)
    assert main(["info", str(store)]) == 2
    assert _one_error_line(capsys) == f"stkd: error: {err}"
