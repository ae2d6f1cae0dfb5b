"""Evaluate a checkpoint on a split, next to the naive baselines.

The checkpoint's own config decides the windows, channels and normalisation; the store must be
the very dataset it was trained on (same fingerprint), otherwise the normalisation statistics and
the graph would silently not match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stkd_dist.checkpoint import load_forecaster
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import check_split_name
from stkd_dist.errors import StoreError
from stkd_dist.location import Location, PathInput
from stkd_dist.metrics import MetricAccumulator, MetricResult
from stkd_dist.paths import resolve_dataset
from stkd_dist.storage import open_store
from stkd_dist.train.loop import build_reader


def metric_json(result: MetricResult) -> dict[str, Any]:
    """``{mae, rmse, mape, mae_per_horizon, rmse_per_horizon, mape_per_horizon, count}``."""
    d = result.to_json()
    return {
        "mae": d["mae"],
        "rmse": d["rmse"],
        "mape": d["mape"],
        "mae_per_horizon": d["mae_h"],
        "rmse_per_horizon": d["rmse_h"],
        "mape_per_horizon": d["mape_h"],
        "count": d["count"],
    }


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics of a checkpoint and of the baselines on one split."""

    model: MetricResult
    baselines: dict[str, MetricResult]
    checkpoint: Location
    version: str
    dataset: str
    split: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": metric_json(self.model),
            **{name: metric_json(r) for name, r in self.baselines.items()},
            "checkpoint": str(self.checkpoint),
            "version": self.version,
            "dataset": self.dataset,
            "split": self.split,
        }


def evaluate_checkpoint(
    ref: PathInput,
    data: PathInput | None = None,
    split: str = "test",
    batch_size: int | None = None,
    role: str = "teacher",
    storage: PathInput | None = None,
    baselines: bool = True,
) -> EvaluationReport:
    """Masked metrics of checkpoint ``ref`` on ``split`` of ``data`` (default: its own dataset).

    Raises :class:`StoreError` when the store's fingerprint differs from the checkpoint's.
    """
    check_split_name(split)
    model, info = load_forecaster(ref, role, storage)
    cfg = info.config
    store = open_store(resolve_dataset(data or cfg.data.dataset, storage))
    if store.fingerprint != info.fingerprint:
        raise StoreError(
            f"the checkpoint was trained on a dataset with fingerprint {info.fingerprint}, "
            f"this store has fingerprint {store.fingerprint}: evaluate it on the dataset it was "
            "trained on",
            where=str(store.path),
        )
    reader = build_reader(cfg, store)
    bs = batch_size or cfg.data.eval_batch_size
    model_metrics = predict_metrics(model, reader, split, bs)
    base: dict[str, MetricResult] = {}
    if baselines:
        from stkd_dist.baselines import evaluate_baselines

        base = dict(evaluate_baselines(reader, split, bs))
    return EvaluationReport(model_metrics, base, info.path, info.version, store.name, split)


def predict_metrics(
    model: torch.nn.Module, reader: WindowReader, split: str, batch_size: int
) -> MetricResult:
    """Metrics of ``model`` over every window of ``split`` (single process, time order)."""
    from stkd_dist.data.loader import make_loader

    acc = MetricAccumulator(reader.window.horizon)
    model.eval()
    with torch.no_grad():
        for batch in make_loader(reader, split, batch_size=batch_size, shuffle=False):
            pred = model(batch.x, batch.time_of_day, batch.day_of_week)
            acc.update(pred, batch.y, batch.mask)
    return acc.compute()
