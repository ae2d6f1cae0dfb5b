"""The result files of a run directory, as the report reads them (:mod:`stkd_dist.report.inputs`).

:func:`write_evaluation` writes ``metrics.json`` (merged into an existing one, so entries other
commands added survive), ``history.json``, ``forecasts.npz`` and ``locations.npz``; every file is
written atomically (:mod:`stkd_dist.location`), so a reader never sees half a file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from stkd_dist import location as loc
from stkd_dist.location import Location, write_bytes_atomic, write_json_atomic
from stkd_dist.pipeline.evaluate_all import Evaluation
from stkd_dist.pipeline.run import RunLayout
from stkd_dist.storage import DatasetStore

#: The models a distillation run trains, in report order.
MODELS = ("teacher", "student_kd", "student_scratch")


def dataset_entry(store: DatasetStore) -> dict[str, Any]:
    """The ``dataset`` entry of ``metrics.json``."""
    return {
        "name": store.name,
        "fingerprint": store.fingerprint,
        "nodes": store.nodes,
        "steps": store.steps,
    }


def write_evaluation(
    layout: RunLayout, ev: Evaluation, store: DatasetStore, models: Sequence[str] = MODELS
) -> list[Location]:
    """Write the evaluation's files into the run directory; return the paths written.

    Args:
        layout: the run directory.
        ev: the evaluation of the run's models and the baselines.
        store: the dataset evaluated on (its ``dataset`` entry and locations).
        models: the experiments whose training history goes to ``history.json``.
    """
    fresh = ev.to_json(dataset_entry(store))
    # entries other commands added (e.g. a sweep's best student) are kept
    old = read_json(layout.metrics) or {}
    write_json_atomic(layout.metrics, {**old, **fresh})
    write_json_atomic(layout.history, training_history(layout, models))
    outputs = [layout.metrics, layout.history]
    if ev.forecasts is not None:
        save_npz_atomic(layout.forecasts, ev.forecasts)
        outputs.append(layout.forecasts)
    locations = store.locations()  # [node, 2] latitude, longitude
    if locations is not None:
        save_npz_atomic(
            layout.locations, {"latitude": locations[:, 0], "longitude": locations[:, 1]}
        )
        outputs.append(layout.locations)
    return outputs


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model / baseline of ``metrics.json`` for the final table."""
    from stkd_dist.report.inputs import MODEL_ORDER, label

    teacher_latency = metrics.get("teacher", {}).get("latency_ms")
    rows = []
    names = [n for n in MODEL_ORDER if n in metrics]
    names += sorted(n for n in metrics if n not in MODEL_ORDER and n != "dataset")
    for name in names:
        m = metrics[name]
        latency = m.get("latency_ms")
        rows.append(
            {
                "model": label(name),
                "test MAE": m.get("mae"),
                "RMSE": m.get("rmse"),
                "MAPE %": m.get("mape"),
                "params": m.get("params"),
                "latency ms": latency,
                "speed-up": teacher_latency / latency if teacher_latency and latency else None,
            }
        )
    return rows


def training_history(
    layout: RunLayout, models: Sequence[str] = MODELS
) -> dict[str, list[dict[str, float]]]:
    """``history.json``: per model, each epoch's train loss and validation MAE.

    Read from the experiments' ``history.jsonl``; when a run was resumed, the last record of an
    epoch wins.
    """
    from stkd_dist.train.ray_session import read_history

    out: dict[str, list[dict[str, float]]] = {}
    for name in models:
        by_epoch: dict[int, dict[str, float]] = {}
        for rec in read_history(layout.experiment(name)):
            if "epoch" in rec and "val_mae" in rec:
                by_epoch[int(rec["epoch"])] = {
                    "epoch": int(rec["epoch"]),
                    "train_loss": float(rec["train_loss"]),
                    "val_mae": float(rec["val_mae"]),
                }
        out[name] = [by_epoch[e] for e in sorted(by_epoch)]
    return out


def save_npz_atomic(path: Location, arrays: dict[str, Any]) -> None:
    """``np.savez`` into memory, then one atomic write to ``path`` (local or object store)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def read_json(path: Location) -> dict[str, Any] | None:
    """A JSON file's object, or None when it is missing or unreadable."""
    try:
        return loc.read_json(path)
    except (OSError, ValueError):
        return None
