"""The canonical store: layout, xarray round-trip, atomic writes, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stkd_dist.errors import InputError, StoreError
from stkd_dist.storage import (
    SCHEMA_VERSION,
    DatasetStore,
    StoreMeta,
    choose_chunks,
    open_store,
    write_store,
)


def test_xarray_reads_store_with_named_dims(make_store):
    path = make_store(steps=200, nodes=5, channels=2)
    ds = xr.open_zarr(path)
    assert dict(ds.sizes) == {"time": 200, "node": 5, "channel": 2}
    assert ds["values"].dims == ("time", "node", "channel")
    assert list(ds["channel"].values) == ["c0", "c1"]
    assert list(ds["node"].values) == [f"n{i}" for i in range(5)]
    assert ds["time"].dtype.kind == "M"
    assert pd.Timestamp(ds["time"].values[1]) - pd.Timestamp(ds["time"].values[0]) == pd.Timedelta(
        "5min"
    )
    # unobserved readings are NaN in `values` and False in `mask`
    values, mask = ds["values"].values, ds["mask"].values
    assert np.array_equal(np.isnan(values), ~mask)


def test_store_attributes(make_store):
    store = open_store(make_store(steps=300, chunk_steps=50))
    attrs = store.attrs
    assert attrs["stkd_schema_version"] == SCHEMA_VERSION
    assert store.chunks == (50, 6, 2)
    assert len(store.fingerprint) == 32
    observed = store.mask[...]
    assert attrs["missing_fraction"] == pytest.approx(1 - observed.mean())
    assert set(attrs["missing"]) == {"c0", "c1"}
    assert "0-210" in attrs["stats"]  # default 70 % training split of 300 steps


def test_fingerprint_depends_on_content_not_chunking(tmp_path):
    from tests.conftest import random_store

    a = open_store(random_store(tmp_path / "a.zarr", chunk_steps=32, seed=1)).fingerprint
    b = open_store(random_store(tmp_path / "b.zarr", chunk_steps=100, seed=1)).fingerprint
    c = open_store(random_store(tmp_path / "c.zarr", chunk_steps=32, seed=2)).fingerprint
    assert a == b
    assert a != c


def _meta(steps: int, nodes: int, channels: int, **kw) -> StoreMeta:
    return StoreMeta(
        name="x",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[str(i) for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        **kw,
    )


def test_failed_write_leaves_nothing(tmp_path):
    values = da.ones((10, 3, 1), chunks=(5, 3, 1))
    mask = da.ones((10, 3, 1), dtype=bool, chunks=(5, 3, 1))
    dest = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match="adjacency is 2x2 but the data has 3 nodes"):
        write_store(dest, values, mask, _meta(10, 3, 1, adjacency=np.eye(2)))
    assert list(tmp_path.iterdir()) == []

    def boom(block):
        raise RuntimeError("disk full")

    broken = values.map_blocks(boom, dtype=np.float32)
    with pytest.raises(RuntimeError, match="disk full"):
        write_store(dest, broken, mask, _meta(10, 3, 1))
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(make_store):
    path = make_store()
    before = open_store(path).fingerprint
    values = da.zeros((40, 2, 1), chunks=(20, 2, 1))
    mask = da.ones((40, 2, 1), dtype=bool, chunks=(20, 2, 1))
    with pytest.raises(StoreError, match="destination exists"):
        write_store(path, values, mask, _meta(40, 2, 1))
    assert open_store(path).fingerprint == before
    write_store(path, values, mask, _meta(40, 2, 1), overwrite=True)
    assert open_store(path).shape == (40, 2, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("array", ["values", "mask"])
def test_missing_chunk_is_detected_on_read_and_by_verify(make_store, array):
    path = make_store(steps=200, chunk_steps=50)
    (path / array / "c" / "2" / "0" / "0").unlink()  # time chunk 2: steps [100, 150)
    store = open_store(path)  # opening reads metadata only, it does not list chunks
    store.read(0, 100)
    with pytest.raises(StoreError, match=r"time chunk 2 \(step 100\) of 'values' or 'mask'"):
        store.read(90, 120)
    with pytest.raises(StoreError, match=f"array '{array}' has 1 of 4 chunks missing"):
        store.verify_chunks()


def test_open_does_not_list_chunks(make_store):
    """Opening a store reads its consolidated metadata only: no listing of any prefix."""
    from zarr.storage import LocalStore

    path = make_store(steps=200, chunk_steps=50)

    class NoListing(LocalStore):
        def list_dir(self, prefix):  # pragma: no cover - fails the test when called
            raise AssertionError(f"listed {prefix!r}")

        def list_prefix(self, prefix):  # pragma: no cover
            raise AssertionError(f"listed {prefix!r}")

        def list(self):  # pragma: no cover
            raise AssertionError("listed the store")

    store = DatasetStore(path, zarr_store=NoListing(str(path), read_only=True))
    assert store.read(0, 10)[0].shape == (10, *store.shape[1:])


def test_store_without_commit_marker_is_incomplete(make_store):
    path = make_store()
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["stkd_schema_version"]
    meta["consolidated_metadata"] = None
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="incomplete store: it has no commit marker"):
        open_store(path)


def test_corrupted_chunk_is_reported_on_read(make_store):
    path = make_store(steps=200, chunk_steps=50)
    chunk = path / "values" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"garbage" * 10)
    store = open_store(path)
    store.read(0, 50)  # chunk 0 is intact
    with pytest.raises(StoreError, match="corrupted"):
        store.read(40, 60)


def test_other_schema_version_is_rejected(make_store):
    path = make_store()
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["stkd_schema_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version is 99"):
        open_store(path)


def test_open_by_name(storage_root: Path, make_store):
    src = make_store(name="mini")
    (storage_root / "datasets").mkdir()
    shutil.copytree(src, storage_root / "datasets" / "mini.zarr")
    assert open_store("mini").name == "mini"
    with pytest.raises(StoreError, match="no dataset named 'nope'"):
        open_store("nope")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((2016, 207, 1), (2016, 207, 1)),  # Los-loop: small, one time chunk
        ((500_000, 2000, 1), (524, 2000, 1)),  # long and wide: ~4 MiB chunks along time
        ((100, 1_000_000, 3), (100, 1365, 3)),  # very wide: nodes chunked too
    ],
)
def test_choose_chunks(shape, expected):
    chunks = choose_chunks(*shape)
    assert chunks == expected
    nbytes = np.prod(chunks) * 4
    assert nbytes <= 16 * 2**20


def test_transient_read_errors_are_retried_not_called_corruption(make_store, monkeypatch):
    """A timeout while fetching a chunk is retried with backoff; only bad bytes are corruption."""
    from zarr.storage import LocalStore

    from stkd_dist.location import errors as loc_errors

    monkeypatch.setattr(loc_errors.time, "sleep", lambda s: None)
    path = make_store(steps=200, chunk_steps=50)
    failures = {"left": 2, "calls": 0}

    class Flaky(LocalStore):
        async def get(self, key, prototype, byte_range=None):
            if key.startswith("values/c/"):
                failures["calls"] += 1
                if failures["left"] > 0:
                    failures["left"] -= 1
                    raise TimeoutError(f"read of {key} timed out")
            return await super().get(key, prototype, byte_range)

    store = DatasetStore(path, zarr_store=Flaky(str(path), read_only=True))
    expected, _ = open_store(path).read(0, 60)
    values, _ = store.read(0, 60)  # two timeouts, then it goes through
    np.testing.assert_array_equal(values, expected)
    assert failures["left"] == 0 and failures["calls"] >= 3

    class Down(LocalStore):
        async def get(self, key, prototype, byte_range=None):
            if key.startswith("values/c/"):
                raise OSError("503 Service Unavailable")
            return await super().get(key, prototype, byte_range)

    down = DatasetStore(path, zarr_store=Down(str(path), read_only=True))
    with pytest.raises(StoreError, match="storage unavailable after 5 attempts") as e:
        down.read(0, 60)
    assert "corrupted" not in str(e.value)
