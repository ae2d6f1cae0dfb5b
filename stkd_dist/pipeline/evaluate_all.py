"""The final evaluation of a run: every model and baseline on the test split, side by side.

One pass over the test windows (single process, time order) feeds every model and both baselines
the same batches, and accumulates for each

* the masked metrics overall and per horizon step (:class:`~stkd_dist.metrics.MetricAccumulator`);
* the MAE of each node (``mae_per_node``, for the report's per-sensor error map);
* the forecasts of a few sensors over the first day of the test split (``forecasts.npz``).

Models also get their parameter count and CPU latency on one batch (:mod:`.latency`). The files
written are those the report reads (see :mod:`stkd_dist.report.inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from stkd_dist.baselines import HistoricalAverage, LastValue
from stkd_dist.config.pipeline import EvaluateSection
from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError
from stkd_dist.metrics import MetricAccumulator, MetricResult
from stkd_dist.pipeline.latency import LatencyResult, measure_latency, model_runner
from stkd_dist.train.evaluate import metric_json

SPLIT = "test"
Predictor = Callable[[WindowBatch], torch.Tensor]  # batch -> [batch, H, node, C_out]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_all` measured.

    Attributes:
        metrics: name -> test metrics.
        node_mae: name -> ``[node]`` MAE of each node (NaN where nothing was observed).
        params: model name -> trainable parameters.
        latency: model name -> latency of one batch.
        latency_batch_size: windows in the timed batch.
        forecasts: the arrays of ``forecasts.npz`` (``time``, ``node_ids``, ``truth``,
            ``pred_<name>``), or None when the test split is empty.
    """

    metrics: dict[str, MetricResult]
    node_mae: dict[str, np.ndarray]
    params: dict[str, int]
    latency: dict[str, LatencyResult]
    latency_batch_size: int
    forecasts: dict[str, np.ndarray] | None

    def to_json(self, dataset: Mapping[str, Any]) -> dict[str, Any]:
        """The ``metrics.json`` object: one entry per model / baseline, plus ``dataset``."""
        out: dict[str, Any] = {}
        for name, result in self.metrics.items():
            entry = metric_json(result)
            entry["mae_per_node"] = [_finite_or_none(v) for v in self.node_mae[name].tolist()]
            if name in self.params:
                entry["params"] = self.params[name]
            if name in self.latency:
                lat = self.latency[name]
                entry["latency_ms"] = lat.median_ms
                entry["latency_batch_size"] = self.latency_batch_size
                entry["latency_threads"] = lat.threads
            out[name] = entry
        out["dataset"] = dict(dataset)
        return out


def _predictor(model: torch.nn.Module) -> Predictor:
    """A model's mean forecast of a batch (any network taking ``x, time_of_day, day_of_week``)."""

    def predict(batch: WindowBatch) -> torch.Tensor:
        mean: torch.Tensor = model(batch.x, batch.time_of_day, batch.day_of_week)
        return mean

    return predict


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def forecast_sensors(nodes: int, count: int) -> np.ndarray:
    """``count`` node indices spread evenly over ``0..nodes-1`` (all nodes if there are fewer)."""
    return np.unique(np.linspace(0, nodes - 1, num=min(count, nodes)).round().astype(np.int64))


class _ForecastRecorder:
    """Keeps the ``step``-ahead forecasts of a few sensors for the first ``limit`` test windows."""

    def __init__(self, reader: WindowReader, sensors: np.ndarray, step: int, limit: int) -> None:
        self.reader = reader
        self.sensors = sensors
        self.step = step
        self.limit = limit
        self.index: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.preds: dict[str, list[np.ndarray]] = {}
        self.count = 0

    def add(self, batch: WindowBatch, preds: Mapping[str, torch.Tensor]) -> None:
        take = min(self.limit - self.count, batch.size)
        if take <= 0:
            return
        s, h = self.sensors, self.step - 1
        # first target channel, horizon step h, chosen sensors: [take, S]
        y = batch.y[:take, h, :, 0][:, s].numpy()
        seen = batch.mask[:take, h, :, 0][:, s].numpy()
        self.truth.append(np.where(seen, y, np.nan).astype(np.float32))
        self.index.append(batch.index[:take].numpy())
        for name, p in preds.items():
            self.preds.setdefault(name, []).append(p[:take, h, :, 0][:, s].float().numpy())
        self.count += take

    def arrays(self) -> dict[str, np.ndarray] | None:
        if not self.count:
            return None
        index = np.concatenate(self.index)
        steps = index + self.reader.window.input_steps + self.step - 1
        out = {
            "time": np.asarray(self.reader.store.time[steps], dtype="datetime64[ns]"),
            "node_ids": np.asarray([str(self.reader.store.node_ids[i]) for i in self.sensors]),
            "truth": np.concatenate(self.truth),
        }
        for name, parts in self.preds.items():
            out[f"pred_{name}"] = np.concatenate(parts)
        return out


def steps_per_day(freq: str) -> int:
    """Steps in one day at frequency ``freq`` (at least 1)."""
    step = pd.Timedelta(pd.tseries.frequencies.to_offset(freq))
    return max(1, int(pd.Timedelta(days=1) // step))


def evaluate_all(
    reader: WindowReader,
    models: Mapping[str, torch.nn.Module],
    section: EvaluateSection,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Evaluate ``models`` (Forecasters in original units) and the baselines on the test split.

    Args:
        reader: the reader the models were trained with (same windows, channels, statistics).
        models: name -> model; evaluated in this order, before the baselines.
        section: latency and forecast settings.
        batch_size: windows per evaluation batch.
        progress: called with ``(windows_done, windows_total)`` after each batch.

    Raises:
        ConfigError: ``evaluate.forecast_step`` beyond the horizon.
    """
    from stkd_dist.data.loader import make_loader

    horizon = reader.window.horizon
    step = horizon if section.forecast_step is None else section.forecast_step
    if step > horizon:
        raise ConfigError(
            f"must be <= the horizon ({horizon}), got {step}", where="evaluate.forecast_step"
        )
    for model in models.values():
        model.eval()
    predictors: dict[str, Predictor] = {name: _predictor(model) for name, model in models.items()}
    predictors["last_value"] = LastValue(reader).predict
    predictors["historical_average"] = HistoricalAverage.fit(reader).predict

    nodes = reader.store.nodes
    accs = {name: MetricAccumulator(horizon) for name in predictors}
    node_err = {name: torch.zeros(nodes, dtype=torch.float64) for name in predictors}
    node_cnt = torch.zeros(nodes, dtype=torch.float64)
    recorder = _ForecastRecorder(
        reader,
        forecast_sensors(nodes, section.forecast_sensors),
        step,
        steps_per_day(reader.store.freq),
    )
    total, done = len(reader.windows(SPLIT)), 0
    with torch.inference_mode():
        for batch in make_loader(reader, SPLIT, batch_size=batch_size, shuffle=False):
            preds = {name: fn(batch) for name, fn in predictors.items()}  # [B, H, N, C_out]
            mask = batch.mask
            node_cnt += mask.sum(dim=(0, 1, 3)).double()
            for name, pred in preds.items():
                accs[name].update(pred, batch.y, mask)
                # float64 before subtracting, as MetricAccumulator does
                err = torch.where(mask, (pred.double() - batch.y.double()).abs(), 0.0)
                node_err[name] += err.sum(dim=(0, 1, 3))
            recorder.add(batch, preds)
            done += int(batch.valid.sum())
            if progress is not None:
                progress(done, total)

    node_mae = {
        name: torch.where(node_cnt > 0, e / node_cnt.clamp_min(1.0), math.nan).numpy()
        for name, e in node_err.items()
    }
    test = reader.windows(SPLIT)
    lat_idx = np.asarray(test[: section.latency_batch_size], dtype=np.int64)
    latency: dict[str, LatencyResult] = {}
    if len(lat_idx) and models:
        lat_batch = reader.batch(lat_idx)
        latency = measure_latency(
            {name: model_runner(m, lat_batch) for name, m in models.items()},
            warmup=section.latency_warmup,
            repeats=section.latency_repeats,
            threads=1,
        )
    params = {
        name: int(sum(p.numel() for p in m.parameters() if p.requires_grad))
        for name, m in models.items()
    }
    return Evaluation(
        metrics={name: acc.compute() for name, acc in accs.items()},
        node_mae=node_mae,
        params=params,
        latency=latency,
        latency_batch_size=len(lat_idx),
        forecasts=recorder.arrays(),
    )
