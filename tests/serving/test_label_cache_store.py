"""The label cache's storage: codecs, 16-bit labels, completeness markers, concurrent writers,
parallel fills, object stores (a real S3 server: moto's), and read amplification of a shuffled
epoch measured at the Zarr store."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
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
    open_cache,
    plan_chunk_rows,
)
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.precompute import TeacherSource, precompute_labels
from stkd_dist.serving.teacher import Teacher
from stkd_dist.serving.write_through import WriteBehind

CHUNK_STEPS = 64  # the serving test store's time chunk (tests/serving/conftest.py)


@pytest.fixture(scope="module")
def reference(direct: Teacher) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The live teacher's labels of every window of train and val (the bits a cache must hold)."""
    out = {}
    for split in ("train", "val"):
        got = direct.predict(np.asarray(direct.meta.splits[split]))
        pred, spread = got.prediction, got.spread
        assert spread is not None
        out[split] = (pred, spread)
    return out


def _files(root: Path) -> dict[str, bytes]:
    """Every label chunk object under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "/c/" in str(p.relative_to(root)).replace(os.sep, "/")
    }


# -- codecs and 16-bit labels ------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip_bitwise(direct, reference, tmp_path, codec: str) -> None:
    path = tmp_path / f"{codec}.zarr"
    cache = precompute_labels(direct, path, ["train", "val"], batch_size=100, codec=codec)
    assert cache.codec == codec and cache.label_dtype == "float32"
    for split in ("train", "val"):
        got = cache.read_split(split)
        pred, spread = got.prediction, got.spread
        np.testing.assert_array_equal(pred, reference[split][0])  # bitwise: a live forward
        np.testing.assert_array_equal(spread, reference[split][1])
        assert cache.is_complete(split) and cache.missing_chunks(split) == []
    # the codec is in the arrays' own Zarr metadata, so any Zarr reader decodes them
    meta = zarr.open_group(str(path), mode="r")["train/prediction"].metadata.to_dict()
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == {"none": "bytes", "zstd": "zstd", "blosc-zstd": "blosc"}[codec]
    raw = 2 * sum(r[0].nbytes for r in reference.values())
    if codec != "none":
        assert cache.stored_bytes() < raw
    # a chunk covers rows of the shard plan's blocks (chunk_steps of the store)
    assert cache.chunk_rows("train") == plan_chunk_rows(
        direct.meta.splits["train"], CHUNK_STEPS, 12 * 5 * 2 * 4
    )


@pytest.mark.parametrize("label_dtype", ["float16", "bfloat16"])
def test_16_bit_labels(direct, reference, tmp_path, label_dtype: str) -> None:
    full = precompute_labels(direct, tmp_path / "f32.zarr", ["train"], codec="none")
    half = precompute_labels(
        direct, tmp_path / "half.zarr", ["train"], codec="none", label_dtype=label_dtype
    )
    attrs = dict(zarr.open_group(str(tmp_path / "half.zarr"), mode="r").attrs)
    assert attrs["label_dtype"] == label_dtype == half.label_dtype
    ref, ref_spread = reference["train"]

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


def test_a_chunk_without_its_marker_is_not_present(direct, reference, tmp_path, monkeypatch):
    cache = LabelCache.create(tmp_path / "c.zarr", direct.meta, ["train"], chunk_steps=64)
    chunks = cache.chunk_windows("train")
    pred, spread = reference["train"]
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
    direct, reference, tmp_path, monkeypatch
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
    assert part.write(idx, LabelArrays(reference["train"][0][:5], reference["train"][1][:5])) == 5
    reader = LabelCache(part.path)
    assert reader.filled_windows("train") == 5 and not reader.is_complete("train")
    assert reader.missing_chunks("train")[0] == 0  # the chunk itself is not done


# -- concurrent writers ------------------------------------------------------------------------
def _concurrent_fill(path: Any, direct: Teacher, reference: Any, writers: int, seed: int) -> None:
    """``writers`` caches on one location write random overlapping batches at once."""
    pred, spread = reference["train"]
    windows = np.asarray(direct.meta.splits["train"])
    caches = [LabelCache(path, mode="r+") for _ in range(writers)]
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            rng = np.random.default_rng([seed, i])
            # each writer covers a random 70 % of the windows, in random batches
            mine = rng.permutation(len(windows))[: int(0.7 * len(windows))]
            barrier.wait()
            for lo in range(0, len(mine), 23):
                rows = mine[lo : lo + 23]
                caches[i].write(windows[rows], LabelArrays(pred[rows], spread[rows]))
                caches[i].add_forward_windows(len(rows))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # every present row is a whole, correct row; nothing absent is taken for present
    reader = LabelCache(path)
    both = reader.read_split("train")
    got, got_spread = both.prediction, both.spread
    assert got_spread is not None
    present = ~np.isnan(got.reshape(len(windows), -1)).any(axis=1)
    assert present.sum() == reader.filled_windows("train")
    np.testing.assert_array_equal(got[present], pred[present])
    np.testing.assert_array_equal(got_spread[present], spread[present])
    covered = np.zeros(len(windows), dtype=bool)
    for i in range(writers):
        covered[
            np.random.default_rng([seed, i]).permutation(len(windows))[: int(0.7 * len(windows))]
        ] = True
    assert present.tolist() == covered.tolist()
    assert reader.forward_windows == writers * int(0.7 * len(windows))


def test_concurrent_writers_never_corrupt_a_chunk(direct, reference, tmp_path) -> None:
    path = tmp_path / "shared.zarr"
    LabelCache.create(path, direct.meta, ["train"], chunk_steps=CHUNK_STEPS)
    _concurrent_fill(path, direct, reference, writers=3, seed=0)
    # a chunk whose rows all sit in fragments is completed by the next writer that sees them
    writer = LabelCache(path, mode="r+")
    done = set(range(len(writer.chunk_windows("train")))) - set(writer.missing_chunks("train"))
    reader = LabelCache(path)
    assert set(reader.missing_chunks("train")).isdisjoint(done)
    for c in done:  # a complete chunk is one object and its fragments are gone
        assert not (path / "_stkd" / "rows" / "train" / str(c)).exists()
        assert (path / "_stkd" / "done" / "train" / str(c)).exists()
    assert done, "with 3 writers of 70 % each most chunks are complete"


def test_write_through_writes_whole_chunks_and_fragments(direct, reference, tmp_path) -> None:
    path = tmp_path / "wt.zarr"
    cache = open_cache(path, direct.meta, writable=True, chunk_steps=CHUNK_STEPS)
    chunks = cache.chunk_windows("train")
    writer = WriteBehind(cache)
    pred, spread = reference["train"]
    first = direct.meta.splits["train"].start
    for w in (chunks[0], chunks[1][:3], chunks[1][3:], chunks[2][:4]):
        writer.put(w, LabelArrays(pred[w - first], spread[w - first]))
    writer.flush()
    assert cache.missing_chunks("train")[:2] == [2, 3]  # chunks 0 and 1 are whole
    assert not (path / "_stkd" / "rows" / "train" / "1").exists()
    assert len(list((path / "_stkd" / "rows" / "train" / "2").iterdir())) == 1
    writer.close()
    reader = LabelCache(path)
    n = len(chunks[0]) + len(chunks[1]) + 4
    assert reader.filled_windows("train") == n == reader.forward_windows
    hit, labels = reader.lookup("train", chunks[2])
    assert hit.tolist() == [True] * 4 + [False] * (len(chunks[2]) - 4)
    assert labels is not None
    np.testing.assert_array_equal(labels.prediction, pred[chunks[2][:4] - first])
    # windows already present are not stored again
    assert (
        cache.write(chunks[0], LabelArrays(pred[chunks[0] - first], spread[chunks[0] - first])) == 0
    )


def test_replicas_creating_one_cache_at_once_share_it(direct, tmp_path) -> None:
    path = tmp_path / "race.zarr"
    opened: list[LabelCache] = []
    barrier = threading.Barrier(3)

    def start() -> None:
        barrier.wait()
        opened.append(open_cache(path, direct.meta, writable=True, chunk_steps=CHUNK_STEPS))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["race.zarr"]  # no temporaries left


# -- parallel fill -----------------------------------------------------------------------------
def test_parallel_fill_equals_serial_fill_bitwise(direct, reference, tmp_path) -> None:
    serial = precompute_labels(direct, tmp_path / "s.zarr", ["train", "val"], workers=1)
    parallel = precompute_labels(
        direct, tmp_path / "p.zarr", ["train", "val"], workers=4, batch_size=37
    )
    for split in ("train", "val"):
        a, b = serial.read_split(split), parallel.read_split(split)
        np.testing.assert_array_equal(a.prediction, b.prediction)
        np.testing.assert_array_equal(a.spread, b.spread)
        np.testing.assert_array_equal(a.prediction, reference[split][0])
    # the very same chunk objects (same bits, same codec)
    assert _files(tmp_path / "s.zarr") == _files(tmp_path / "p.zarr")
    assert (
        serial.forward_windows
        == parallel.forward_windows
        == sum(len(direct.meta.splits[s]) for s in ("train", "val"))
    )


# -- object store ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables point at it."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="stkd-labels")
        yield "s3://stkd-labels"
    server.stop()


@pytest.mark.slow
def test_object_store_cache(direct, reference, s3_bucket: str) -> None:
    url = f"{s3_bucket}/labels/t.zarr"
    cache = precompute_labels(direct, url, ["train", "val"], workers=2, label_dtype="float16")
    assert loc_.is_remote(cache.path) and loc_.url(cache.path) == url
    reader = LabelCache(url)
    assert reader.is_complete("train") and reader.label_dtype == "float16"
    windows = np.random.default_rng(1).permutation(np.asarray(direct.meta.splits["train"]))[:50]
    hit, labels = reader.lookup("train", windows)
    assert hit.all() and labels is not None
    first = direct.meta.splits["train"].start
    expected = reference["train"][0][windows - first].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(labels.prediction, expected)
    with pytest.raises(StoreError, match="--overwrite"):
        precompute_labels(direct, url, ["train"])

    # a failed fill in place removes what it wrote
    def broken(idx: np.ndarray, hidden: bool = False) -> Any:
        raise RuntimeError("teacher died")

    failed = f"{s3_bucket}/labels/failed.zarr"
    real = direct.predict
    direct.predict = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="teacher died"):
            precompute_labels(direct, failed, ["train"])
    finally:
        direct.predict = real  # type: ignore[method-assign]
    assert not loc_.exists(loc_.location(failed))


@pytest.mark.slow
def test_concurrent_writers_on_an_object_store(direct, reference, s3_bucket: str) -> None:
    url = f"{s3_bucket}/labels/shared.zarr"
    # one chunk for the whole split: every write of both writers lands in the same chunk
    LabelCache.create(url, direct.meta, ["train"])
    _concurrent_fill(url, direct, reference, writers=2, seed=3)


# -- read amplification ------------------------------------------------------------------------
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


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    torch.set_num_threads(1)
    if ray.is_initialized():  # another module's cluster: use it, leave it to its owner
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_ray_fill_equals_serial_fill_bitwise(
    ray_local: None, teacher_env, direct, reference, tmp_path, s3_bucket: str
) -> None:
    source = TeacherSource(str(teacher_env.checkpoint), str(teacher_env.store))
    serial = precompute_labels(direct, tmp_path / "s.zarr", ["train", "val"], mode="threads")
    # a local cache: the tasks return their chunks and this process writes them
    local = precompute_labels(
        direct, tmp_path / "r.zarr", ["train", "val"], source=source, workers=2, mode="ray"
    )
    assert _files(tmp_path / "s.zarr") == _files(tmp_path / "r.zarr")
    # an object-store cache: each task writes its own chunks
    url = f"{s3_bucket}/labels/ray.zarr"
    remote = precompute_labels(direct, url, ["train"], source=source, workers=2)
    for split, cache in (("train", local), ("val", local), ("train", remote)):
        got = cache.read_split(split)
        np.testing.assert_array_equal(got.prediction, reference[split][0])
        np.testing.assert_array_equal(got.spread, reference[split][1])
    assert remote.forward_windows == len(direct.meta.splits["train"])
    assert local.forward_windows == serial.forward_windows
