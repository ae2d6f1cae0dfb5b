"""The label cache's storage: codecs, 16-bit labels, completeness markers, and read
amplification of a shuffled epoch measured at the Zarr store."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from stkd_dist import location as loc_
from stkd_dist.data.plan import make_plan
from stkd_dist.errors import StoreError
from stkd_dist.serving import cache as cache_mod
from stkd_dist.serving.cache import (
    CODECS,
    COMMIT_MARKER,
    DESIGN_AMPLIFICATION,
    PLAN_WORLD_SIZES,
    LabelCache,
    _block_rows,
    chunk_amplification,
    decode_labels,
    encode_labels,
    plan_chunk_rows,
)
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.precompute import precompute_labels

CHUNK_STEPS = 64  # the serving test store's time chunk (tests/serving/conftest.py)


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip_bitwise(direct, split_labels, tmp_path, codec: str) -> None:
    path = tmp_path / f"{codec}.zarr"
    cache = precompute_labels(direct, path, ["train", "val"], batch_size=100, codec=codec)
    assert cache.codec == codec and cache.label_dtype == "float32"
    for split in ("train", "val"):
        got = cache.read_split(split)
        pred, spread = got.prediction, got.spread
        np.testing.assert_array_equal(pred, split_labels[split][0])  # bitwise: a live forward
        np.testing.assert_array_equal(spread, split_labels[split][1])
        assert cache.is_complete(split) and cache.missing_chunks(split) == []
    # the codec is in the arrays' own Zarr metadata, so any Zarr reader decodes them
    meta = zarr.open_group(str(path), mode="r")["train/prediction"].metadata.to_dict()
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == {"none": "bytes", "zstd": "zstd", "blosc-zstd": "blosc"}[codec]
    raw = 2 * sum(r[0].nbytes for r in split_labels.values())
    if codec != "none":
        assert cache.stored_bytes() < raw
    # a chunk covers rows of the shard plan's blocks (chunk_steps of the store)
    assert cache.chunk_rows("train") == plan_chunk_rows(
        direct.meta.splits["train"], CHUNK_STEPS, 12 * 5 * 2 * 4
    )


@pytest.mark.parametrize("label_dtype", ["float16", "bfloat16"])
def test_16_bit_labels(direct, split_labels, tmp_path, label_dtype: str) -> None:
    full = precompute_labels(direct, tmp_path / "f32.zarr", ["train"], codec="none")
    half = precompute_labels(
        direct, tmp_path / "half.zarr", ["train"], codec="none", label_dtype=label_dtype
    )
    attrs = dict(zarr.open_group(str(tmp_path / "half.zarr"), mode="r").attrs)
    assert attrs["label_dtype"] == label_dtype == half.label_dtype
    ref, ref_spread = split_labels["train"]

    def rounded(a: np.ndarray) -> np.ndarray:
        if label_dtype == "float16":
            return a.astype(np.float16).astype(np.float32)
        return torch.from_numpy(a).to(torch.bfloat16).float().numpy()  # torch's own rounding

    expected = rounded(ref)
    got = half.read_split("train")
    pred, spread = got.prediction, got.spread
    assert pred.dtype == np.float32 and spread is not None
    np.testing.assert_array_equal(pred, expected)
    np.testing.assert_array_equal(spread, rounded(ref_spread))
    np.testing.assert_allclose(pred, ref, rtol=1e-2, atol=1e-2)
    hit, labels = half.lookup("train", np.asarray(direct.meta.splits["train"])[[5, 3, 200]])
    assert hit.all() and labels is not None
    np.testing.assert_array_equal(labels.prediction, expected[[5, 3, 200]])
    assert half.stored_bytes() * 1.9 < full.stored_bytes()  # half the bytes (plus metadata)


def test_bfloat16_encoding_matches_torch_on_edge_values() -> None:
    values = np.array(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.3e38, 3.39e38, np.inf, -np.inf, 1e-40, np.nan],
        dtype=np.float32,
    )
    ours = decode_labels(encode_labels(values, "bfloat16"), "bfloat16")
    theirs = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, theirs)  # NaN positions compare equal too


# -- completeness ------------------------------------------------------------------------------
def test_unfinished_or_foreign_folders_are_no_cache(direct, tmp_path) -> None:
    cache = LabelCache.create(tmp_path / "a.zarr", direct.meta, ["train"])
    (tmp_path / "a.zarr" / COMMIT_MARKER).unlink()  # as if creation crashed before its end
    with pytest.raises(StoreError, match="unfinished"):
        LabelCache(cache.path)
    old = zarr.open_group(str(tmp_path / "v1.zarr"), mode="w", zarr_format=3)
    old.attrs.update({"stkd_label_cache_version": 1})
    with pytest.raises(StoreError, match="schema version 2"):
        LabelCache(tmp_path / "v1.zarr")


def test_a_chunk_without_its_marker_is_not_present(direct, split_labels, tmp_path, monkeypatch):
    cache = LabelCache.create(tmp_path / "c.zarr", direct.meta, ["train"], chunk_steps=64)
    chunks = cache.chunk_windows("train")
    pred, spread = split_labels["train"]
    rows = cache.chunk_rows("train")
    cache.write_chunk("train", 0, LabelArrays(pred[:rows], spread[:rows]))
    real = loc_.write_json_atomic

    def crash_on_marker(loc: Any, data: Any) -> None:
        if "/done/" in str(loc):
            raise OSError("killed between the data and the marker")
        real(loc, data)

    monkeypatch.setattr(cache_mod.loc_, "write_json_atomic", crash_on_marker)
    with pytest.raises(OSError, match="killed"):
        cache.write_chunk("train", 1, LabelArrays(pred[rows : 2 * rows], spread[rows : 2 * rows]))
    monkeypatch.undo()
    # chunk 1's data is in the store, but nothing vouches for it
    assert (tmp_path / "c.zarr" / "train" / "prediction" / "c" / "1").exists()
    reader = LabelCache(cache.path)
    assert reader.filled_windows("train") == rows and not reader.is_complete("train")
    assert reader.missing_chunks("train")[0] == 1
    hit, labels = reader.lookup("train", np.concatenate([chunks[0], chunks[1]]))
    assert hit.tolist() == [True] * rows + [False] * rows
    assert labels is not None
    np.testing.assert_array_equal(labels.prediction, pred[:rows])
    # a stray temporary file of a crashed atomic write is not a fragment
    frag_dir = tmp_path / "c.zarr" / "_stkd" / "rows" / "train" / "2"
    frag_dir.mkdir(parents=True)
    (frag_dir / ".x.npz.123.tmp").write_bytes(b"half a fragm")
    assert LabelCache(cache.path).filled_windows("train") == rows


def test_a_failed_fill_leaves_no_cache_and_a_partial_one_is_not_complete(
    direct, split_labels, tmp_path, monkeypatch
) -> None:
    calls = {"n": 0}
    real = direct.predict

    def flaky(idx: np.ndarray, hidden: bool = False) -> LabelArrays:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("node lost")
        return real(idx, hidden=hidden)

    monkeypatch.setattr(direct, "predict", flaky)
    out = tmp_path / "labels" / "x.zarr"
    with pytest.raises(RuntimeError, match="node lost"):
        precompute_labels(direct, out, ["train"], batch_size=20, workers=3)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    # rows of half a chunk (write-through) are present, but the split is not complete
    part = LabelCache.create(tmp_path / "p.zarr", direct.meta, ["train"], chunk_steps=64)
    idx = np.asarray(direct.meta.splits["train"])[:5]
    assert (
        part.write(idx, LabelArrays(split_labels["train"][0][:5], split_labels["train"][1][:5]))
        == 5
    )
    reader = LabelCache(part.path)
    assert reader.filled_windows("train") == 5 and not reader.is_complete("train")
    assert reader.missing_chunks("train")[0] == 0  # the chunk itself is not done


class CountingStore(WrapperStore[Store]):
    """A Zarr store that counts the bytes it returns (what was fetched from the real store)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.fetched: dict[str, int] = {}

    def _with_store(self, store: Store) -> CountingStore:
        twin = CountingStore(store)
        twin.fetched = self.fetched
        return twin

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.fetched[key] = self.fetched.get(key, 0) + len(buf)
        return buf


@pytest.mark.parametrize("world", [2, 4])
def test_shuffled_epoch_reads_little_more_than_it_uses(direct, tmp_path, world: int) -> None:
    path = tmp_path / "amp.zarr"
    precompute_labels(direct, path, ["train"], codec="zstd")
    windows = direct.meta.splits["train"]
    plan = make_plan(windows, CHUNK_STEPS, world, epoch=1, seed=5, batch_size=16)
    fetched = used = 0
    for r in range(world):
        stores: list[CountingStore] = []

        def wrap(store: Store, stores: list[CountingStore] = stores) -> CountingStore:
            stores.append(CountingStore(store))
            return stores[-1]

        cache = LabelCache(path, wrap_store=wrap)
        sizes = {k: v for k, v in stores[0].fetched.items() if "/c/" in k}  # none yet
        assert sizes == {}
        idx, valid = plan.rank(r).entries()
        rows = cache.chunk_rows("train")
        got = 0
        for lo, hi in plan.batch_bounds():
            ok = valid[lo:hi]
            hit, _ = cache.lookup("train", idx[lo:hi][ok], with_spread=False)
            assert hit.all()
            got += int(ok.sum())
        chunk_bytes = {k: v for k, v in stores[0].fetched.items() if "/prediction/c/" in k}
        fetched += sum(chunk_bytes.values())
        # the bytes of the rows this rank used: each row's share of its chunk object
        for w in plan.rank(r).windows:
            c = (w - windows.start) // windows.step // rows
            key = next(k for k in chunk_bytes if k.endswith(f"/c/{c}/0/0/0"))
            n_rows = min(rows, len(windows) - c * rows)
            used += loc_.location(path / key).stat().st_size / n_rows
        assert got == len(plan.rank(r).windows)
        assert not any("/spread/c/" in k for k in stores[0].fetched)  # not asked for: not read
    amplification = fetched / used
    assert amplification <= 2.0, amplification


def test_chunk_rows_follow_the_shard_plan() -> None:
    for windows, chunk_steps, row in [
        (range(0, 24000), 5065, 9936),
        (range(0, 6025), 8640, 4800),
        (range(0, 100000), 64, 100),
        (range(3, 30000, 3), 1000, 40000),
    ]:
        rows = plan_chunk_rows(windows, chunk_steps, row)
        assert 1 <= rows * row <= cache_mod.TARGET_CHUNK_BYTES
        for world in PLAN_WORLD_SIZES:
            amp = chunk_amplification(*_block_rows(windows, chunk_steps, world), rows, len(windows))
            assert amp <= DESIGN_AMPLIFICATION, (windows, world, rows, amp)
    # chunks of 64 windows in a 64-step store never straddle a block
    assert plan_chunk_rows(range(0, 100000), 64, 100) == 64
