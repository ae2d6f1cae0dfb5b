"""What a report is made from: the files a run directory holds.

A run directory (``<storage>/runs/<run>/``) holds:

* ``metrics.json`` (required): one entry per model or baseline (``teacher``, ``student_kd``,
  ``student_scratch``, ``last_value``, ``historical_average``) with ``mae``, ``rmse``, ``mape`` and
  per-horizon lists (``mae_per_horizon``, ...); models also ``params`` and ``latency_ms``; optional
  ``mae_per_node``. A ``dataset`` entry has ``name``, ``fingerprint``, ``nodes``, ``steps``.
* ``history.json`` (optional): ``{model: [{"epoch", "train_loss", "val_mae"}, ...]}``.
* ``forecasts.npz`` (optional): ``time`` (datetime64 [T]), ``node_ids`` [S], ``truth`` [T, S] and one
  array per model ``pred_<model>`` [T, S]: forecasts vs truth for a few sensors over a day.
* ``locations.npz`` (optional): ``latitude``, ``longitude`` [node], for the per-sensor error map.
* ``sweep/leaderboard.csv`` (optional): one row per trial (``trial``, ``params``, ``test_mae``, ...).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stkd_dist.errors import InputError
from stkd_dist.location import Location, PathInput, exists, location, read_bytes, read_text, url

MODEL_ORDER = ("teacher", "student_kd", "student_scratch", "last_value", "historical_average")
LABELS = {
    "teacher": "teacher",
    "student_kd": "student (distilled)",
    "student_scratch": "student (no distillation)",
    "last_value": "last value",
    "historical_average": "historical average",
}


@dataclass(frozen=True)
class ReportInputs:
    """The parsed contents of a run directory."""

    run_dir: Location
    metrics: dict[str, dict[str, Any]]
    dataset: dict[str, Any]
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    forecasts: dict[str, np.ndarray] | None = None
    locations: dict[str, np.ndarray] | None = None
    leaderboard: pd.DataFrame | None = None
    sweep: dict[str, Any] | None = None

    @property
    def trials(self) -> pd.DataFrame | None:
        """The leaderboard's trial rows (without the ``soup`` and ``ensemble`` aggregates)."""
        board = self.leaderboard
        if board is None or "kind" not in board.columns:
            return board
        return board[board["kind"] == "trial"]

    @property
    def aggregates(self) -> pd.DataFrame | None:
        """The leaderboard's ``soup`` and ``ensemble`` rows (None without a sweep)."""
        board = self.leaderboard
        if board is None or "kind" not in board.columns:
            return None
        return board[board["kind"] != "trial"]

    @property
    def models(self) -> list[str]:
        """Entries in display order: known names first, then any others."""
        known = [m for m in MODEL_ORDER if m in self.metrics]
        return known + sorted(m for m in self.metrics if m not in MODEL_ORDER)


def label(name: str) -> str:
    return LABELS.get(name, name.replace("_", " "))


def load_inputs(run_dir: PathInput | Location) -> ReportInputs:
    """Read a run directory; raises :class:`InputError` when ``metrics.json`` is missing or bad."""
    run_dir = location(run_dir)
    path = run_dir / "metrics.json"
    if not exists(path):
        raise InputError("no metrics.json: run `stkd distill` (or evaluate) first", where=url(path))
    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e})", where=url(path)) from e
    dataset = raw.pop("dataset", {})
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "mae" not in entry:
            raise InputError(
                f"entry {name!r} must be an object with at least 'mae'", where=url(path)
            )
    history = {}
    if exists(run_dir / "history.json"):
        history = json.loads(read_text(run_dir / "history.json"))
    forecasts = _npz(run_dir / "forecasts.npz")
    locations = _npz(run_dir / "locations.npz")
    leaderboard, sweep = read_sweep(run_dir)
    return ReportInputs(run_dir, raw, dataset, history, forecasts, locations, leaderboard, sweep)


def read_sweep(run_dir: Location) -> tuple[pd.DataFrame | None, dict[str, Any] | None]:
    """``sweep/leaderboard.csv`` and ``sweep/summary.json`` of a run (None when absent)."""
    board = run_dir / "sweep" / "leaderboard.csv"
    leaderboard = (
        pd.read_csv(io.BytesIO(read_bytes(board)), dtype={"trial": str}) if exists(board) else None
    )
    path = run_dir / "sweep" / "summary.json"
    summary = json.loads(read_text(path)) if exists(path) else None
    return leaderboard, summary


def _npz(path: Location) -> dict[str, np.ndarray] | None:
    if not exists(path):
        return None
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
