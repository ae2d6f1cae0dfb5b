"""WindowReader: batches equal an independent NumPy computation on a real Zarr store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from stkd_dist.data.batch import DataDims, WindowBatch
from stkd_dist.data.reader import WindowReader, merge_spans
from stkd_dist.data.windows import SplitSpec, WindowSpec
from stkd_dist.errors import ConfigError, InputError
from stkd_dist.storage import open_store


def raw_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """The store's arrays read with zarr directly (not through the store class)."""
    group = zarr.open_group(path, mode="r")
    return np.asarray(group["values"][...]), np.asarray(group["mask"][...])


def numpy_stats(values, mask, train_end, per_node):
    """Masked mean / population std of the training steps, computed independently."""
    v = np.where(mask[:train_end], values[:train_end], 0.0).astype(np.float64)
    m = mask[:train_end].astype(np.float64)
    axis = 0 if per_node else (0, 1)
    n = m.sum(axis=axis)
    mean = v.sum(axis=axis) / n
    std = np.sqrt((v**2).sum(axis=axis) / n - mean**2)
    return mean, std


def expected_batch(values, mask, indices, L, H, mean, std, cin, cout):
    xs, ys, xm, ym = [], [], [], []
    for t in indices:
        xv, xmask = values[t : t + L][..., cin], mask[t : t + L][..., cin]
        yv, ymask = values[t + L : t + L + H][..., cout], mask[t + L : t + L + H][..., cout]
        xs.append(np.where(xmask, (xv - mean[..., cin]) / std[..., cin], 0.0))
        xm.append(xmask)
        ys.append(np.where(ymask, yv, 0.0))
        ym.append(ymask)
    return np.stack(xs), np.stack(ys), np.stack(xm), np.stack(ym)


@pytest.fixture
def store_path(make_store):
    return make_store(steps=600, nodes=5, channels=3, chunk_steps=50, missing=0.1, seed=3)


@pytest.mark.parametrize("per_node", [False, True])
def test_batch_matches_numpy(store_path, per_node):
    values, mask = raw_arrays(store_path)
    reader = WindowReader(
        open_store(store_path), WindowSpec(input_steps=6, horizon=4), per_node_stats=per_node
    )
    mean, std = numpy_stats(values, mask, train_end=420, per_node=per_node)
    np.testing.assert_allclose(
        reader.stats.mean, numpy_stats(values, mask, 420, False)[0], rtol=1e-5
    )
    indices = [0, 7, 3, 400, 590 - 10, 200, 201]  # unsorted, far apart and neighbours
    b = reader.batch(indices)
    assert isinstance(b, WindowBatch)
    ex, ey, exm, eym = expected_batch(values, mask, indices, 6, 4, mean, std, [0, 1, 2], [0, 1, 2])
    assert b.x.shape == (7, 6, 5, 3) and b.x.dtype == torch.float32
    assert b.y.shape == (7, 4, 5, 3) and b.mask.dtype == torch.bool
    assert b.index.tolist() == indices
    np.testing.assert_allclose(b.x.numpy(), ex, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(b.y.numpy(), ey.astype(np.float32))
    np.testing.assert_array_equal(b.x_mask.numpy(), exm)
    np.testing.assert_array_equal(b.mask.numpy(), eym)
    assert not b.mask.all() and b.mask.any()  # the store really has missing targets
    for t in (b.x, b.y):
        assert torch.isfinite(t).all()
    assert b.valid.all()


def test_time_features(store_path):
    reader = WindowReader(open_store(store_path), WindowSpec(input_steps=5, horizon=2))
    indices = np.array([0, 280, 291, 500])
    b = reader.batch(indices)
    # the store starts on Monday 2024-01-01 00:00 with 5-minute steps
    steps = indices[:, None] + np.arange(5)
    minutes = steps * 5
    np.testing.assert_allclose(b.time_of_day.numpy(), (minutes % 1440) / 1440, atol=1e-6)
    np.testing.assert_array_equal(b.day_of_week.numpy(), (minutes // 1440) % 7)
    assert b.time_of_day.shape == (4, 5) and b.day_of_week.dtype == torch.int64
    assert float(b.time_of_day.max()) < 1.0


def test_channel_selection_and_dims(store_path):
    values, mask = raw_arrays(store_path)
    reader = WindowReader(
        open_store(store_path),
        WindowSpec(input_steps=3, horizon=2),
        input_channels=["c2", "c0"],
        target_channels=["c1"],
    )
    assert reader.input_idx == [2, 0] and reader.target_idx == [1]
    assert reader.dims == DataDims(nodes=5, input_steps=3, horizon=2, in_channels=2, out_channels=1)
    mean, std = numpy_stats(values, mask, 420, False)
    b = reader.batch([10, 11])
    ex, ey, _, eym = expected_batch(values, mask, [10, 11], 3, 2, mean, std, [2, 0], [1])
    np.testing.assert_allclose(b.x.numpy(), ex, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(b.y.numpy(), ey.astype(np.float32))
    np.testing.assert_array_equal(b.mask.numpy(), eym)
    tm, ts = reader.target_scale()
    assert tm.shape == ts.shape == (5, 1)
    np.testing.assert_allclose(tm[:, 0], mean[1], rtol=1e-5)
    im, _ = reader.input_scale()
    assert im.shape == (5, 2)
    np.testing.assert_allclose(im[0], mean[[2, 0]], rtol=1e-5)


def test_per_node_scales(store_path):
    values, mask = raw_arrays(store_path)
    reader = WindowReader(open_store(store_path), per_node_stats=True, target_channels=["c0"])
    mean, std = numpy_stats(values, mask, 420, True)
    tm, ts = reader.target_scale()
    np.testing.assert_allclose(tm[:, 0], mean[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ts[:, 0], std[:, 0], rtol=1e-4)
    assert not np.allclose(tm[0], tm[1])  # per node really differs


def test_valid_flags_clear_mask(store_path):
    reader = WindowReader(open_store(store_path), WindowSpec(input_steps=4, horizon=4))
    b = reader.batch([5, 6, 5], valid=np.array([True, True, False]))
    assert b.valid.tolist() == [True, True, False]
    assert b.mask[2].sum() == 0 and b.mask[0].sum() > 0
    # the padding sample still carries the repeated window's inputs
    torch.testing.assert_close(b.x[2], b.x[0])


def test_batch_from_block_equals_batch(store_path):
    reader = WindowReader(open_store(store_path), WindowSpec(input_steps=6, horizon=6))
    values, mask = open_store(store_path).read(100, 180)
    idx = np.array([150, 100, 168])
    a = reader.batch_from_block(values, mask, 100, idx)
    b = reader.batch(idx)
    for ta, tb in zip(a, b, strict=True):
        torch.testing.assert_close(ta, tb)
    with pytest.raises(InputError, match="outside the block"):
        reader.batch_from_block(values, mask, 100, np.array([169]))


def test_windows_and_empty_batch(store_path):
    reader = WindowReader(open_store(store_path), WindowSpec(input_steps=6, horizon=4))
    assert reader.windows("train") == range(0, 420 - 10 + 1)
    assert reader.windows("val") == range(420, 480 - 10 + 1)
    b = reader.batch([])
    assert b.x.shape == (0, 6, 5, 3) and b.size == 0


def test_merge_spans():
    assert merge_spans(np.array([0, 1, 2]), 5, 10) == [(0, 7)]
    # gap of 10 steps between [0, 5) and [15, 20) is not < 10: two reads
    assert merge_spans(np.array([0, 15]), 5, 10) == [(0, 5), (15, 20)]
    assert merge_spans(np.array([0, 14]), 5, 10) == [(0, 19)]


def test_errors(store_path, make_store):
    store = open_store(store_path)
    with pytest.raises(InputError, match="unknown channel 'speed'") as e:
        WindowReader(store, input_channels=["c0", "speed"])
    assert e.value.where == "input_channels"
    with pytest.raises(InputError, match="unknown channel") as e:
        WindowReader(store, target_channels=["nope"])
    assert e.value.where == "target_channels"
    with pytest.raises(InputError, match="repeat"):
        WindowReader(store, input_channels=["c0", "c0"])
    with pytest.raises(InputError, match="at least one"):
        WindowReader(store, input_channels=[])
    short = open_store(make_store(name="short", steps=20, chunk_steps=10))
    with pytest.raises(InputError, match="shorter than one window of L\\+H = 24"):
        WindowReader(short)
    for field in ("input_steps", "horizon", "stride"):
        for bad in (0, -3):
            with pytest.raises(InputError, match="positive integer") as e:
                WindowReader(store, WindowSpec(**{field: bad}))
            assert e.value.where == field
    with pytest.raises(InputError, match="sum to 1"):
        WindowReader(store, splits=SplitSpec(train=0.5, val=0.1, test=0.1))
    # a training split too short for one window does not fit this series
    with pytest.raises(InputError, match="split 'train' spans 30 steps") as e:
        WindowReader(store, WindowSpec(input_steps=20, horizon=20), SplitSpec(0.05, 0.05, 0.9))
    assert e.value.where == "split.train"
    with pytest.raises(ConfigError):
        WindowReader(store, window={"input_steps": 3})  # type: ignore[arg-type]
    reader = WindowReader(store, WindowSpec(input_steps=6, horizon=4))
    with pytest.raises(InputError, match="window 591 is out of range"):
        reader.batch([3, 591])
    with pytest.raises(InputError, match="out of range"):
        reader.batch([-1])
    with pytest.raises(InputError, match="integers"):
        reader.batch(np.array([1.5]))
    with pytest.raises(InputError, match="valid must have shape"):
        reader.batch([1, 2], valid=np.array([True]))
