"""Filling the label cache: concurrent writers, write-through, replicas sharing one cache,
parallel and Ray fills equal to a serial one bitwise, and object stores (a real S3 server:
moto's)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stkd_dist import location as loc_
from stkd_dist.errors import StoreError
from stkd_dist.serving.cache import (
    LabelCache,
    open_cache,
)
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.precompute import TeacherSource, precompute_labels
from stkd_dist.serving.teacher import Teacher
from stkd_dist.serving.write_through import WriteBehind

CHUNK_STEPS = 64  # the serving test store's time chunk (tests/serving/conftest.py)


def _files(root: Path) -> dict[str, bytes]:
    """Every label chunk object under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "/c/" in str(p.relative_to(root)).replace(os.sep, "/")
    }


def _concurrent_fill(
    path: Any, direct: Teacher, split_labels: Any, writers: int, seed: int
) -> None:
    """``writers`` caches on one location write random overlapping batches at once."""
    pred, spread = split_labels["train"]
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


def test_concurrent_writers_never_corrupt_a_chunk(direct, split_labels, tmp_path) -> None:
    path = tmp_path / "shared.zarr"
    LabelCache.create(path, direct.meta, ["train"], chunk_steps=CHUNK_STEPS)
    _concurrent_fill(path, direct, split_labels, writers=3, seed=0)
    # a chunk whose rows all sit in fragments is completed by the next writer that sees them
    writer = LabelCache(path, mode="r+")
    done = set(range(len(writer.chunk_windows("train")))) - set(writer.missing_chunks("train"))
    reader = LabelCache(path)
    assert set(reader.missing_chunks("train")).isdisjoint(done)
    for c in done:  # a complete chunk is one object and its fragments are gone
        assert not (path / "_stkd" / "rows" / "train" / str(c)).exists()
        assert (path / "_stkd" / "done" / "train" / str(c)).exists()
    assert done, "with 3 writers of 70 % each most chunks are complete"


def test_write_through_writes_whole_chunks_and_fragments(direct, split_labels, tmp_path) -> None:
    path = tmp_path / "wt.zarr"
    cache = open_cache(path, direct.meta, writable=True, chunk_steps=CHUNK_STEPS)
    chunks = cache.chunk_windows("train")
    writer = WriteBehind(cache)
    pred, spread = split_labels["train"]
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
def test_parallel_fill_equals_serial_fill_bitwise(direct, split_labels, tmp_path) -> None:
    serial = precompute_labels(direct, tmp_path / "s.zarr", ["train", "val"], workers=1)
    parallel = precompute_labels(
        direct, tmp_path / "p.zarr", ["train", "val"], workers=4, batch_size=37
    )
    for split in ("train", "val"):
        a, b = serial.read_split(split), parallel.read_split(split)
        np.testing.assert_array_equal(a.prediction, b.prediction)
        np.testing.assert_array_equal(a.spread, b.spread)
        np.testing.assert_array_equal(a.prediction, split_labels[split][0])
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
def test_object_store_cache(direct, split_labels, s3_bucket: str) -> None:
    url = f"{s3_bucket}/labels/t.zarr"
    cache = precompute_labels(direct, url, ["train", "val"], workers=2, label_dtype="float16")
    assert loc_.is_remote(cache.path) and loc_.url(cache.path) == url
    reader = LabelCache(url)
    assert reader.is_complete("train") and reader.label_dtype == "float16"
    windows = np.random.default_rng(1).permutation(np.asarray(direct.meta.splits["train"]))[:50]
    hit, labels = reader.lookup("train", windows)
    assert hit.all() and labels is not None
    first = direct.meta.splits["train"].start
    expected = split_labels["train"][0][windows - first].astype(np.float16).astype(np.float32)
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
def test_concurrent_writers_on_an_object_store(direct, split_labels, s3_bucket: str) -> None:
    url = f"{s3_bucket}/labels/shared.zarr"
    # one chunk for the whole split: every write of both writers lands in the same chunk
    LabelCache.create(url, direct.meta, ["train"])
    _concurrent_fill(url, direct, split_labels, writers=2, seed=3)


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
    ray_local: None, teacher_env, direct, split_labels, tmp_path, s3_bucket: str
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
        np.testing.assert_array_equal(got.prediction, split_labels[split][0])
        np.testing.assert_array_equal(got.spread, split_labels[split][1])
    assert remote.forward_windows == len(direct.meta.splits["train"])
    assert local.forward_windows == serial.forward_windows
