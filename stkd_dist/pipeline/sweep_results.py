"""What a sweep leaves behind: its folder, the leaderboard, the Pareto front and the best student.

:func:`collect_rows` evaluates the best checkpoint of every trial on the test split;
:func:`pareto_rows` keeps the trials no other one beats on both size and test MAE;
:func:`export_best` copies the overall best student to ``<run>/sweep/best/``;
:func:`update_run_metrics` adds it to the run's ``metrics.json`` for the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stkd_dist.config import Config, write_config
from stkd_dist.config.sweep import ParamSpec
from stkd_dist.errors import StoreError
from stkd_dist.location import (
    Location,
    copy_tree,
    exists,
    ray_location,
    read_json,
    relative,
    remove,
    rename_or_copy,
    temporary_sibling,
    url,
    write_json_atomic,
    write_text_atomic,
)
from stkd_dist.pipeline.run import RunLayout
from stkd_dist.pipeline.trial_records import ROLE, TIME_ATTR, TRIAL_DIR_PREFIX
from stkd_dist.pipeline.tune_space import applied

if TYPE_CHECKING:
    from stkd_dist.checkpoint import CheckpointInfo
    from stkd_dist.models import Forecaster

#: the name of the sweep's best student in the run's metrics.json
ENTRY = "student_sweep"
#: what the trials are ranked by (lower is better)
METRIC = "val_mae"


@dataclass(frozen=True)
class SweepLayout:
    """Where a sweep keeps its files: ``<run>/sweep/``."""

    root: Location

    @classmethod
    def of(cls, run: RunLayout) -> SweepLayout:
        return cls(run.root / "sweep")

    @property
    def tune(self) -> Location:
        """The Ray Tune experiment (what a resumed sweep restores)."""
        return self.root / "tune"

    @property
    def trials(self) -> Location:
        """The trials' own records: ``trials/<trial id>/starts.jsonl`` and label deliveries."""
        return self.root / "trials"

    @property
    def best(self) -> Location:
        return self.root / "best"

    @property
    def soup(self) -> Location:
        """The greedy weight soup (a student checkpoint, see :mod:`.sweep_aggregate`)."""
        return self.root / "soup"

    @property
    def ensemble(self) -> Location:
        """The top-k ensemble's manifest folder (see :mod:`.sweep_aggregate`)."""
        return self.root / "ensemble"

    @property
    def leaderboard(self) -> Location:
        return self.root / "leaderboard.csv"

    @property
    def pareto(self) -> Location:
        return self.root / "pareto.csv"

    @property
    def summary(self) -> Location:
        return self.root / "summary.json"

    @property
    def settings(self) -> Location:
        """What the experiment in :attr:`tune` was started with (checked when resuming)."""
        return self.root / "settings.json"


@dataclass(frozen=True)
class TrialRow:
    """One trial on the leaderboard: its best checkpoint, evaluated.

    Attributes:
        trial: Tune's trial id.
        params: trainable parameters of the student.
        val_mae: validation MAE of the trial's best checkpoint.
        test_mae, test_rmse, test_mape: test metrics of that checkpoint.
        epochs: epochs the trial ran (fewer than ``sweep.max_epochs`` when ASHA or its own early
            stopping ended it; ``summary.json`` says which).
        best_epoch: the epoch of the best checkpoint (1-based).
        model: the student model key.
        checkpoint: the best checkpoint's directory.
        settings: the sampled settings (dotted key -> value).
    """

    trial: str
    params: int
    val_mae: float
    test_mae: float
    test_rmse: float
    test_mape: float
    epochs: int
    best_epoch: int
    model: str
    checkpoint: Location
    settings: dict[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[Forecaster, CheckpointInfo]:
        """The trial's best checkpoint as ``(model on the CPU in eval mode, its info)``."""
        from stkd_dist.checkpoint import load_forecaster

        return load_forecaster(self.checkpoint, role=ROLE)

    def record(self, root: Location) -> dict[str, Any]:
        """The leaderboard row (checkpoint relative to ``root``)."""
        return {
            "trial": self.trial,
            "kind": "trial",
            "params": self.params,
            "val_mae": self.val_mae,
            "test_mae": self.test_mae,
            "test_rmse": self.test_rmse,
            "test_mape": self.test_mape,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "model": self.model,
            **self.settings,
            "checkpoint": relative(self.checkpoint, root),
        }


def _best_checkpoint(result: Any, root: Location) -> tuple[Location, dict[str, Any]] | None:
    """The kept checkpoint of a trial with the lowest validation MAE."""
    kept = [
        (ray_location(c.path, root), m)
        for c, m in (result.best_checkpoints or [])
        if m.get(METRIC) is not None and math.isfinite(float(m[METRIC]))
    ]
    if not kept:
        return None
    return min(kept, key=lambda cm: (float(cm[1][METRIC]), int(cm[1].get("epoch", 0))))


def trial_id_of(result: Any) -> str:
    """Tune's id of the trial of ``result``: from its folder (``trial_<id>``), which a trial that
    failed before reporting has too. Not from its metrics: a trial that PBT let continue from
    another's last checkpoint, with nothing left to train, ends with that trial's last result."""
    name = str(result.path).rstrip("/").rsplit("/", 1)[-1]
    if name.startswith(TRIAL_DIR_PREFIX):
        return name.removeprefix(TRIAL_DIR_PREFIX)
    return str((result.metrics or {}).get("trial_id", name))


def collect_rows(
    results: Any,
    specs: tuple[ParamSpec, ...],
    reader: Any,
    batch_size: int,
    echo: Callable[[str], None],
    root: Location,
) -> tuple[list[TrialRow], dict[str, int]]:
    """Evaluate every trial's best checkpoint on the test split: ``(rows, counts)``.

    ``root`` is the Tune experiment's storage (Ray reports checkpoint paths within it).

    ``counts`` has ``trials``, ``errored``, ``without_checkpoint`` and ``label_reads`` (training
    windows the trials read from the label cache, all epochs).
    """
    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.train.evaluate import predict_metrics

    rows: list[TrialRow] = []
    counts = {"trials": len(results), "errored": 0, "without_checkpoint": 0, "label_reads": 0}
    for result in results:
        if result.error is not None:
            counts["errored"] += 1
            echo(f"trial {trial_id_of(result)} failed: {result.error}")
        frame = result.metrics_dataframe
        if frame is not None and "samples" in frame:
            counts["label_reads"] += int(frame["samples"].fillna(0).sum())
        best = _best_checkpoint(result, root)
        if best is None:
            counts["without_checkpoint"] += 1
            continue
        path, metrics = best
        model, info = load_forecaster(path, role=ROLE)
        test = predict_metrics(model, reader, "test", batch_size)
        rows.append(
            TrialRow(
                trial=trial_id_of(result),
                params=model.num_params(),
                val_mae=float(metrics[METRIC]),
                test_mae=float(test.mae),
                test_rmse=float(test.rmse),
                test_mape=float(test.mape),
                epochs=int(result.metrics.get(TIME_ATTR, info.epoch + 1)),
                best_epoch=info.epoch + 1,
                model=model.key,
                checkpoint=path,
                settings=applied(info.config, result.config, specs),
            )
        )
    rows.sort(key=lambda r: (r.val_mae, r.params, r.trial))
    return rows, counts


def pareto_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The trials no other trial beats on both parameters and test MAE, fewest parameters first."""
    from stkd_dist.report.plots import pareto_front

    finite = [r for r in rows if math.isfinite(r.test_mae)]
    if not finite:
        return []
    keep = pareto_front(
        np.asarray([r.params for r in finite], dtype=float),
        np.asarray([r.test_mae for r in finite], dtype=float),
    )
    return sorted((finite[i] for i in keep), key=lambda r: (r.params, r.test_mae))


def write_csv(frame: pd.DataFrame, path: Location) -> None:
    write_text_atomic(path, frame.to_csv(index=False))


def export_best(row: TrialRow, layout: SweepLayout, test: dict[str, Any]) -> Location:
    """Copy ``row``'s checkpoint to ``<run>/sweep/best/`` with ``config.yaml`` and ``metrics.json``.

    The folder is assembled under a temporary name and moved into place with its ``meta.json``
    (the checkpoint's completion marker) last, so ``best/`` is never taken for a complete
    checkpoint before it is one.
    """
    from stkd_dist.checkpoint import META, read_checkpoint

    info = read_checkpoint(row.checkpoint)  # verifies the files against meta.json
    tmp = temporary_sibling(layout.best)
    old = temporary_sibling(layout.best, "old")
    try:
        copy_tree(row.checkpoint, tmp, last=(META,))
        write_config(info.config, tmp / "config.yaml")
        write_json_atomic(
            tmp / "metrics.json",
            {
                "trial": row.trial,
                "version": info.version,
                "epoch": info.epoch,
                "params": row.params,
                "val_mae": row.val_mae,
                "test": test,
                "settings": row.settings,
            },
        )
        if exists(layout.best):
            rename_or_copy(layout.best, old)
        rename_or_copy(tmp, layout.best, last=(META,))
    finally:
        remove(tmp)
        remove(old)
    return layout.best


def update_run_metrics(
    run: RunLayout,
    reader: Any,
    cfg: Config,
    best: Location,
    teacher: Location,
) -> dict[str, Any]:
    """Add the sweep's best student to the run's ``metrics.json`` (created when absent).

    A run without ``metrics.json`` (no ``stkd distill`` yet) gets one with the teacher, the best
    student and the baselines, so the report has its table; an existing one keeps its entries and
    gains (or replaces) :data:`ENTRY`. Returns the best student's entry.
    """
    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.pipeline.evaluate_all import evaluate_all

    student, _ = load_forecaster(best, role=ROLE)
    models = {ENTRY: student}
    existing: dict[str, Any] | None = None
    if exists(run.metrics):
        try:
            existing = read_json(run.metrics)
        except (OSError, ValueError) as e:
            raise StoreError(f"unreadable ({e}); delete it to rebuild it", url(run.metrics)) from e
    else:
        models = {"teacher": load_forecaster(teacher)[0], ENTRY: student}
    evaluation = evaluate_all(reader, models, cfg.evaluate, cfg.data.eval_batch_size)
    store = reader.store
    dataset = {
        "name": store.name,
        "fingerprint": store.fingerprint,
        "nodes": store.nodes,
        "steps": store.steps,
    }
    fresh = evaluation.to_json(dataset)
    data = fresh if existing is None else {**existing, ENTRY: fresh[ENTRY]}
    write_json_atomic(run.metrics, data)
    return fresh[ENTRY]


def json_safe(value: Any) -> Any:
    """Strict-JSON data: NumPy scalars as Python numbers, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
