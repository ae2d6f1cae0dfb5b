"""Naive baselines, evaluated exactly like the models.

* ``last_value``: every horizon step repeats the last observed input value of the node and
  channel (the most recent observed one within the input window; the node's training mean when
  none is observed).
* ``historical_average``: the mean of the same time-of-week slot over the training split, per node
  and channel; a slot never observed in training falls back to the node's training mean.

Both predict from a :class:`WindowBatch` in original units, ``[batch, H, node, C_out]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import dask
import numpy as np
import pandas as pd
import torch

from stkd_dist.compute import compute
from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import StoreError
from stkd_dist.metrics import MetricAccumulator, MetricResult

MINUTES_PER_DAY = 1440
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
BASELINES = ("last_value", "historical_average")


def _node_mean(reader: WindowReader) -> np.ndarray:
    """``[node, C_out]`` training mean of the target channels."""
    return np.asarray(reader.stats.node_mean[:, reader.target_idx], dtype=np.float32)


class LastValue:
    """Repeat the last observed input value (see the module docstring).

    Args:
        reader: the reader the batches come from. When every target channel is an input channel
            the history is taken from the batch itself (de-normalised); otherwise the input steps of
            the target channels are read from the reader's store.
    """

    name = "last_value"

    def __init__(self, reader: WindowReader) -> None:
        self.reader = reader
        self.fallback = torch.from_numpy(_node_mean(reader))  # [node, C_out]
        inputs = reader.input_idx
        self._pos = [inputs.index(c) for c in reader.target_idx if c in inputs]
        self._from_batch = len(self._pos) == len(reader.target_idx)
        mean, std = reader.input_scale()  # [node, C_in]
        self._in_mean, self._in_std = torch.from_numpy(mean), torch.from_numpy(std)

    def history(self, batch: WindowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Input-window values of the target channels in original units, and where observed.

        Both ``[batch, L, node, C_out]``.
        """
        if self._from_batch:
            pos = self._pos
            values = batch.x[..., pos] * self._in_std[:, pos] + self._in_mean[:, pos]
            return values, batch.x_mask[..., pos]
        idx = batch.index.numpy()
        lo, hi = self.reader.span(idx)
        stored, mask = self.reader.store.read(lo, hi)  # [t, node, channel]
        steps = idx[:, None] - lo + np.arange(self.reader.window.input_steps)  # [batch, L]
        v = stored[steps][..., self.reader.target_idx]
        m = mask[steps][..., self.reader.target_idx] & np.isfinite(v)
        return torch.from_numpy(np.where(m, v, 0.0).astype(np.float32)), torch.from_numpy(m)

    def predict(self, batch: WindowBatch) -> torch.Tensor:
        values, observed = self.history(batch)  # [batch, L, node, C_out]
        steps = torch.arange(values.shape[1]).reshape(1, -1, 1, 1)
        last = torch.where(observed, steps, -1).amax(dim=1)  # [batch, node, C_out]
        latest = values.gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1)
        pred = torch.where(last >= 0, latest, self.fallback)  # [batch, node, C_out]
        return pred.unsqueeze(1).expand(-1, self.reader.window.horizon, -1, -1)


def step_minutes(freq: str) -> float:
    """Minutes per step of a fixed pandas frequency string (``"5min"`` → 5)."""
    try:
        minutes = pd.Timedelta(pd.tseries.frequencies.to_offset(freq)) / pd.Timedelta(minutes=1)
    except (ValueError, TypeError) as e:
        raise StoreError(f"frequency {freq!r} is not a fixed time step ({e})", "freq") from e
    if not 0 < minutes <= MINUTES_PER_WEEK:
        raise StoreError(f"frequency {freq!r} must be between 0 and one week", "freq")
    return float(minutes)


def week_slot(minute_of_week: np.ndarray, step: float, slots: int) -> np.ndarray:
    """Time-of-week slot of minutes of the week (nearest step, so float round-off is harmless)."""
    return np.rint(np.asarray(minute_of_week, dtype=np.float64) / step).astype(np.int64) % slots


def _slot_sums(values: np.ndarray, mask: np.ndarray, slots: np.ndarray, n_slots: int) -> np.ndarray:
    """``[2, slot, node, C]`` float64 sums and counts of observed values of one block."""
    out = np.zeros((2, n_slots, *values.shape[1:]), dtype=np.float64)
    m = mask & np.isfinite(values)
    np.add.at(out[0], slots, np.where(m, values, 0.0))
    np.add.at(out[1], slots, m)
    return out


class HistoricalAverage:
    """Per node / channel mean of each time-of-week slot in the training split.

    Build with :meth:`fit`. Attributes: ``table`` ``[slot, node, C_out]`` float32 (fallback filled
    in), ``counts`` ``[slot, node, C_out]`` observed readings per slot, ``step`` minutes per step.
    """

    name = "historical_average"

    def __init__(self, table: np.ndarray, counts: np.ndarray, step: float, horizon: int) -> None:
        self.table = torch.from_numpy(np.asarray(table, dtype=np.float32))
        self.counts = counts
        self.step = step
        self.slots = table.shape[0]
        self.horizon = horizon

    @classmethod
    def fit(cls, reader: WindowReader) -> HistoricalAverage:
        """Average the training steps of ``reader``'s store by time-of-week slot (with Dask)."""
        store = reader.store
        step = step_minutes(store.freq)
        n_slots = math.ceil(MINUTES_PER_WEEK / step)
        lo, hi = reader.splits.step_ranges(store.steps)["train"]
        time = store.time[lo:hi]
        minutes = (time - time.normalize()) / pd.Timedelta(minutes=1)
        mow = np.asarray(time.day_of_week, np.float64) * MINUTES_PER_DAY + np.asarray(minutes)
        slots = week_slot(mow, step, n_slots)  # [t]
        targets = reader.target_idx
        # one time chunk per task, every node and target channel in it
        values = store.dask("values")[lo:hi][:, :, targets].rechunk({1: -1, 2: -1})
        mask = store.dask("mask")[lo:hi][:, :, targets].rechunk(values.chunks)
        bounds = np.cumsum((0, *values.chunks[0]))
        parts = [
            dask.delayed(_slot_sums)(v, m, slots[a:b], n_slots)
            for v, m, a, b in zip(
                values.to_delayed().ravel(),
                mask.to_delayed().ravel(),
                bounds[:-1],
                bounds[1:],
                strict=True,
            )
        ]
        (totals,) = compute(dask.delayed(sum)(parts))  # [2, slot, node, C_out]
        sums, counts = totals
        fallback = _node_mean(reader)[None]  # [1, node, C_out]
        table = np.where(counts > 0, sums / np.maximum(counts, 1), fallback)
        return cls(table, counts.astype(np.int64), step, reader.window.horizon)

    def predict(self, batch: WindowBatch) -> torch.Tensor:
        # the batch has the time features of the INPUT steps; the target steps follow the last one
        # at one step each: slot(last input) + 1 .. + H
        day = batch.day_of_week[:, -1].double() + batch.time_of_day[:, -1].double()
        last = torch.round(day * MINUTES_PER_DAY / self.step).long()  # as week_slot, in torch
        first = last % self.slots + 1  # [batch]
        slots = (first[:, None] + torch.arange(self.horizon)) % self.slots  # [batch, H]
        return self.table[slots]  # [batch, H, node, C_out]


def evaluate_baselines(
    reader: WindowReader,
    split: str,
    batch_size: int = 64,
    mape_eps: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, MetricResult]:
    """Masked metrics of every baseline over the windows of ``split`` (single process).

    Args:
        reader: the reader (windows, channels, statistics) the models are evaluated with.
        split: ``train``, ``val`` or ``test``.
        batch_size: windows per batch.
        mape_eps: see :class:`MetricAccumulator`.
        progress: called with ``(windows_done, windows_total)`` after each batch.
    """
    from stkd_dist.data.loader import make_loader

    models: dict[str, LastValue | HistoricalAverage] = {
        "last_value": LastValue(reader),
        "historical_average": HistoricalAverage.fit(reader),
    }
    accs = {name: MetricAccumulator(reader.window.horizon, mape_eps) for name in models}
    total, done = len(reader.windows(split)), 0
    for batch in make_loader(reader, split, batch_size=batch_size, shuffle=False):
        for name, model in models.items():
            accs[name].update(model.predict(batch), batch.y, batch.mask)
        done += int(batch.valid.sum())
        if progress is not None:
            progress(done, total)
    return {name: acc.compute() for name, acc in accs.items()}
