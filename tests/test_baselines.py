"""Baselines on a real on-disk store against NumPy / pandas references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stkd_dist.baselines import HistoricalAverage, LastValue, evaluate_baselines, step_minutes
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import WindowSpec
from stkd_dist.errors import StoreError
from stkd_dist.storage import open_store

L, H = 4, 3
WINDOW = WindowSpec(input_steps=L, horizon=H)


@pytest.fixture
def store_path(make_store: Callable[..., Path]) -> Path:
    # a bit over a week of 5-minute steps, heavily masked so every fallback is exercised
    return make_store(steps=2300, nodes=3, channels=2, chunk_steps=256, missing=0.6, seed=3)


def _raw(path: Path) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
    store = open_store(path)
    values, mask = store.read(0, store.steps)
    return values.astype(np.float64), mask & np.isfinite(values), store.time


def _train_node_mean(values: np.ndarray, mask: np.ndarray, train_end: int) -> np.ndarray:
    v, m = values[:train_end], mask[:train_end]
    return np.where(m, v, 0).sum(0) / m.sum(0)  # [node, channel]


def _last_value_ref(values, mask, node_mean, starts, targets) -> np.ndarray:
    out = np.empty((len(starts), H, values.shape[1], len(targets)))
    for b, t in enumerate(starts):
        for n in range(values.shape[1]):
            for j, c in enumerate(targets):
                found = [values[s, n, c] for s in range(t + L - 1, t - 1, -1) if mask[s, n, c]]
                out[b, :, n, j] = found[0] if found else node_mean[n, c]
    return out


def _historical_ref(values, mask, time, node_mean, train_end, starts, targets) -> np.ndarray:
    slot = np.asarray(time.day_of_week * 288 + time.hour * 12 + time.minute // 5)
    table = {}
    for s in np.unique(slot[:train_end]):
        rows = np.flatnonzero(slot[:train_end] == s)
        m = mask[rows]
        with np.errstate(invalid="ignore"):
            table[s] = np.where(m, values[rows], 0).sum(0) / m.sum(0)  # NaN where unseen
    out = np.empty((len(starts), H, values.shape[1], len(targets)))
    for b, t in enumerate(starts):
        for h in range(H):
            mean = table.get(slot[t + L + h], np.full(values.shape[1:], np.nan))
            out[b, h] = np.where(np.isnan(mean), node_mean, mean)[:, targets]
    return out


def _metrics_ref(pred: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[float, float, list]:
    err = np.abs(pred - y)[m]
    mae_h = [np.abs(pred - y)[:, h][m[:, h]].mean() for h in range(H)]
    return err.mean(), np.sqrt((err**2).mean()), mae_h


def _targets(values, mask, starts, targets) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(starts)[:, None] + L + np.arange(H)
    return values[steps][..., targets], mask[steps][..., targets]


@pytest.mark.parametrize(
    ("inputs", "targets"),
    [(None, None), (["c0"], ["c1"])],  # targets among the inputs (from the batch) or not (store)
)
def test_last_value_matches_reference(store_path: Path, inputs, targets) -> None:
    reader = WindowReader(
        open_store(store_path), WINDOW, input_channels=inputs, target_channels=targets
    )
    values, mask, _ = _raw(store_path)
    node_mean = _train_node_mean(values, mask, reader.splits.step_ranges(len(values))["train"][1])
    starts = list(reader.windows("test"))[:200]
    batch = reader.batch(starts)
    pred = LastValue(reader).predict(batch)
    assert pred.shape == (len(starts), H, 3, len(reader.target_idx))
    ref = _last_value_ref(values, mask, node_mean, starts, reader.target_idx)
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-5, atol=1e-4)
    # some windows had no observed input for a node: the fallback was exercised
    hist = np.stack([mask[t : t + L] for t in starts])[..., reader.target_idx]
    assert (~hist.any(axis=1)).any()


def test_historical_average_matches_reference(store_path: Path) -> None:
    reader = WindowReader(open_store(store_path), WINDOW)
    values, mask, time = _raw(store_path)
    train_end = reader.splits.step_ranges(len(values))["train"][1]
    node_mean = _train_node_mean(values, mask, train_end)
    ha = HistoricalAverage.fit(reader)
    assert ha.slots == 2016 and ha.step == 5.0
    assert ha.counts.sum() == mask[:train_end].sum()
    starts = list(reader.windows("test"))
    pred = ha.predict(reader.batch(starts))
    ref = _historical_ref(values, mask, time, node_mean, train_end, starts, reader.target_idx)
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-5, atol=1e-4)
    # the test split reaches slots seen in training and slots never seen
    slot = np.asarray(time.day_of_week * 288 + time.hour * 12 + time.minute // 5)
    target_slots = {int(slot[t + L + h]) for t in starts for h in range(H)}
    seen = set(slot[:train_end].tolist())
    assert target_slots & seen and target_slots - seen


def test_evaluate_baselines_equals_numpy_metrics(store_path: Path) -> None:
    reader = WindowReader(open_store(store_path), WINDOW)
    values, mask, time = _raw(store_path)
    train_end = reader.splits.step_ranges(len(values))["train"][1]
    node_mean = _train_node_mean(values, mask, train_end)
    starts = list(reader.windows("val"))
    calls: list[tuple[int, int]] = []
    results = evaluate_baselines(
        reader, "val", batch_size=50, progress=lambda d, t: calls.append((d, t))
    )
    assert set(results) == {"last_value", "historical_average"}
    assert calls[-1] == (len(starts), len(starts))
    y, m = _targets(values, mask, starts, reader.target_idx)
    refs = {
        "last_value": _last_value_ref(values, mask, node_mean, starts, reader.target_idx),
        "historical_average": _historical_ref(
            values, mask, time, node_mean, train_end, starts, reader.target_idx
        ),
    }
    for name, pred in refs.items():
        mae, rmse, mae_h = _metrics_ref(pred, y, m)
        assert results[name].mae == pytest.approx(mae, rel=1e-5)
        assert results[name].rmse == pytest.approx(rmse, rel=1e-5)
        np.testing.assert_allclose(results[name].mae_h, mae_h, rtol=1e-5)
        assert results[name].count == m.sum()


def test_padding_samples_do_not_count(store_path: Path) -> None:
    reader = WindowReader(open_store(store_path), WINDOW)
    starts = list(reader.windows("test"))[:10]
    valid = np.arange(10) < 7
    batch = reader.batch(starts, valid=valid)
    pred = LastValue(reader).predict(batch)
    assert torch.isfinite(pred).all()
    assert not batch.mask[~torch.from_numpy(valid)].any()


def test_step_minutes() -> None:
    assert step_minutes("5min") == 5.0
    assert step_minutes("1h") == 60.0
    with pytest.raises(StoreError, match="not a fixed time step"):
        step_minutes("MS")
