"""Writing synthetic stores: chunk-independent fingerprints, bounded tasks, reuse, atomicity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from dask.callbacks import Callback

from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.storage import open_store
from stkd_dist.synth import (
    BLOCK_STEPS,
    SYNTH_ATTR,
    SynthSpec,
    TrafficModel,
    ensure_synthetic,
    synthesize,
    synthetic_array,
)


def test_fingerprint_depends_on_seed_not_on_chunking(tmp_path):
    spec = SynthSpec(nodes=8, steps=BLOCK_STEPS + 500, seed=11)
    a = open_store(synthesize(spec, tmp_path / "a.zarr", chunk_steps=300))
    b = open_store(synthesize(spec, tmp_path / "b.zarr", chunk_steps=1000))
    c = open_store(synthesize(dataclasses.replace(spec, seed=12), tmp_path / "c.zarr"))
    assert a.chunks == (300, 8, 1) and b.chunks == (1000, 8, 1)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert np.array_equal(a.values[...], b.values[...], equal_nan=True)


def test_store_holds_the_model_output_and_metadata(tmp_path):
    spec = SynthSpec(nodes=9, steps=700, seed=2, channels=("flow", "speed"), freq="10min")
    store = open_store(synthesize(spec, tmp_path / "s.zarr", name="sname"))
    model = TrafficModel(spec)
    values, mask = store.read(0, store.steps)
    expected = model.block(0)
    assert np.array_equal(values, expected, equal_nan=True)
    assert np.array_equal(mask, ~np.isnan(expected))
    assert store.name == "sname"
    assert store.channels == ["flow", "speed"]
    assert store.freq == "10min"
    assert list(store.time) == list(spec.time)
    assert len(set(store.node_ids)) == 9
    np.testing.assert_array_equal(store.adjacency(), model.graph.adjacency)
    np.testing.assert_allclose(store.locations(), model.graph.locations())
    assert SynthSpec.from_json(store.attrs[SYNTH_ATTR]) == spec
    assert "synthetic" in store.attrs["provenance"]
    assert store.attrs["missing_fraction"] == pytest.approx(1 - mask.mean())


class _Largest(Callback):
    """Records the largest task result and how often each generator block ran."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.blocks: list[str] = []

    def _posttask(self, key, result, dsk, state, worker_id):
        self.largest = max(self.largest, getattr(result, "nbytes", 0))
        name = key[0] if isinstance(key, tuple) else key
        if "synth-block" in str(name):
            self.blocks.append(str(key))


def test_write_is_block_by_block_and_never_holds_the_whole_array(tmp_path):
    spec = SynthSpec(nodes=60, steps=6 * BLOCK_STEPS + 123, seed=1)
    model = TrafficModel(spec)
    lazy = synthetic_array(model)
    assert lazy.numblocks[0] == 7  # one task per generated block, nothing computed yet
    progress = []
    with _Largest() as watch:
        path = synthesize(
            spec, tmp_path / "m.zarr", chunk_steps=500, on_block=lambda d, t: progress.append(d)
        )
    whole = spec.steps * spec.nodes * 4
    block = BLOCK_STEPS * spec.nodes * 4
    assert watch.largest <= 2 * block < whole / 3
    assert len(watch.blocks) == len(set(watch.blocks)) == 7  # each block generated once
    assert progress == list(range(1, 8))
    store = open_store(path)
    assert store.shape == (spec.steps, 60, 1)
    assert zarr.open_array(path / "values").nchunks == -(-spec.steps // 500)


def test_existing_destination_needs_overwrite(tmp_path):
    spec = SynthSpec(nodes=5, steps=300)
    path = synthesize(spec, tmp_path / "x.zarr")
    before = open_store(path).fingerprint
    with pytest.raises(StoreError, match="--overwrite"):
        synthesize(dataclasses.replace(spec, seed=1), path)
    assert open_store(path).fingerprint == before
    synthesize(dataclasses.replace(spec, seed=1), path, overwrite=True)
    assert open_store(path).fingerprint != before
    assert [p.name for p in tmp_path.iterdir()] == ["x.zarr"]  # no temporaries left


def test_bad_chunk_steps(tmp_path):
    with pytest.raises(ConfigError) as e:
        synthesize(SynthSpec(nodes=5, steps=300), tmp_path / "x.zarr", chunk_steps=0)
    assert e.value.where == "--chunk-steps"
    assert not (tmp_path / "x.zarr").exists()


def test_ensure_reuses_same_spec_and_replaces_other(tmp_path, make_store):
    spec = SynthSpec(nodes=6, steps=400, seed=3)
    dest = tmp_path / "d.zarr"
    path, created = ensure_synthetic(spec, dest)
    assert created
    marker = (path / "zarr.json").stat().st_mtime_ns
    fp = open_store(path).fingerprint
    path, created = ensure_synthetic(spec, dest)
    assert not created
    assert (path / "zarr.json").stat().st_mtime_ns == marker
    path, created = ensure_synthetic(dataclasses.replace(spec, seed=4), dest)
    assert created and open_store(path).fingerprint != fp


def test_ensure_replaces_a_damaged_store_but_not_a_foreign_one(tmp_path, make_store):
    spec = SynthSpec(nodes=6, steps=400, seed=3)
    dest = tmp_path / "d.zarr"
    ensure_synthetic(spec, dest)
    for chunk in (dest / "values" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # a chunk missing on disk: the store no longer opens
    path, created = ensure_synthetic(spec, dest)
    assert created and open_store(path).steps == 400

    foreign = make_store("foreign", steps=100)
    fp = open_store(foreign).fingerprint
    with pytest.raises(StoreError, match="did not make"):
        ensure_synthetic(spec, foreign)
    assert open_store(foreign).fingerprint == fp
