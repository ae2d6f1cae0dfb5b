"""``stkd sweep``: a Ray Tune sweep of student and distillation settings over one shared teacher.

Stages (the ``dataset`` → ``teacher`` → ``labels`` stages are ``stkd distill``'s, run and
recorded by the same :class:`~stkd_dist.pipeline.graph.StageGraph`, so either command reuses the
other's work in the same run):

1. **Teacher.** The checkpoint given (``--checkpoint``), else the run's teacher stage: trained,
   or skipped when complete.
2. **Labels** (:mod:`.sweep_labels`). ``sweep.labels: stream`` (default): the sweep starts the
   teacher's replicas; the trials' workers stream from them, and they write every window they
   compute through to the run's label cache (``<run>/labels/<teacher version>.zarr``) and serve
   it from there afterwards. ``sweep.labels: cache``: the ``labels`` stage fills the cache first
   and the trials read it. Either way the sweep costs as many teacher forward passes as there
   are distinct windows, however many trials and epochs read them.
3. **Trials.** Ray Tune draws ``sweep.samples`` settings from ``sweep.space`` and trains a student
   for each (:mod:`.tune_trial`); ASHA stops the unpromising ones at its rungs, or PBT lets the
   worst continue from the best ones' checkpoints with mutated settings (:mod:`.sweep_tuner`); a
   crashed trial restarts from its latest checkpoint up to ``sweep.max_failures`` times. The
   experiment lives in ``<run>/sweep/tune``: running the same run name again after an
   interruption restores it (finished trials are kept, unfinished ones continue from their latest
   checkpoint).
4. **Aggregation.** Each trial's best checkpoint is evaluated on the test split; the leaderboard,
   the Pareto front of parameters vs test MAE and ``summary.json`` (with each trial's stop reason
   and worker processes, from the trials' own records, and the PBT exploits) are written to
   ``<run>/sweep/``, the overall best student (lowest validation MAE) is exported to
   ``<run>/sweep/best/`` (checkpoint + ``config.yaml`` + ``metrics.json``), and the run report is
   rendered again with the sweep's plot and leaderboard.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stkd_dist.checkpoint import read_checkpoint
from stkd_dist.config import Config, write_config
from stkd_dist.config.sweep import ParamSpec
from stkd_dist.errors import ConfigError, StkdError, StoreError
from stkd_dist.location import (
    absolute,
    exists,
    makedirs,
    read_json,
    relative,
    url,
    write_json_atomic,
)
from stkd_dist.pipeline.graph import StageGraph
from stkd_dist.pipeline.run import config_digest
from stkd_dist.pipeline.stages import RaySession
from stkd_dist.pipeline.sweep_aggregate import aggregate
from stkd_dist.pipeline.sweep_labels import trial_labels
from stkd_dist.pipeline.sweep_results import (
    SweepLayout,
    TrialRow,
    collect_rows,
    export_best,
    json_safe,
    pareto_rows,
    update_run_metrics,
    write_csv,
)
from stkd_dist.pipeline.tune_space import check_space
from stkd_dist.pipeline.tune_trial import TrialJob
from stkd_dist.pipeline.ui import PipelineUI

log = logging.getLogger(__name__)

#: splits whose windows get teacher labels: the student's loss reads the training windows only
LABEL_SPLITS = ("train",)


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`run_sweep` did.

    Attributes:
        layout: the sweep's folder.
        rows: the leaderboard, best validation MAE first (empty when interrupted).
        best: the exported best trial (None when interrupted).
        summary: the contents of ``summary.json``.
        resumed: the Tune experiment was restored from an earlier, interrupted sweep.
        interrupted: the sweep stopped before every trial finished (run it again to resume).
    """

    layout: SweepLayout
    rows: tuple[TrialRow, ...]
    best: TrialRow | None
    summary: dict[str, Any]
    resumed: bool
    interrupted: bool


def check_forecast_loss(cfg: Config, specs: Sequence[ParamSpec]) -> None:
    """Every ``distill.loss`` a trial can draw must compare forecasts (what the cache holds)."""
    from stkd_dist.train.student import FORECAST_LOSSES

    losses = [cfg.distill.loss]
    for spec in specs:
        if spec.key == "distill.loss":
            losses = [str(v) for v in spec.args]
    bad = [loss for loss in losses if loss not in FORECAST_LOSSES]
    if bad:
        raise ConfigError(
            f"loss {bad[0]!r} distils class logits, but the label cache holds the teacher's "
            f"forecasts; use one of {', '.join(FORECAST_LOSSES)}",
            where="sweep.space.distill.loss" if len(losses) > 1 else "distill.loss",
        )


def _check_teacher_data(teacher_cfg: Config, cfg: Config, where: str) -> None:
    """The student's windows must be the teacher's, or its labels would not line up."""
    t, s = teacher_cfg.data, cfg.data
    same = (t.window(), t.splits(), t.input_channels, t.target_channels or t.input_channels) == (
        s.window(),
        s.splits(),
        s.input_channels,
        s.target_channels or s.input_channels,
    )
    if not same:
        raise ConfigError(
            "the teacher was trained on other windows, splits or channels than this config's "
            "data section, so its labels do not match the student's windows; use the teacher's "
            "data settings",
            where=where,
        )


def _settings(cfg: Config, teacher_version: str) -> dict[str, Any]:
    """What the Tune experiment depends on; a resumed sweep must match it."""
    key = config_digest(
        cfg, ["data", "student", "distill", "sweep", "run.seed"], teacher=teacher_version
    )
    return {"key": key, "teacher": teacher_version, "space": dict(cfg.sweep.space)}


def _check_settings(layout: SweepLayout, settings: dict[str, Any]) -> None:
    path = layout.settings
    if not exists(path):
        raise StoreError(
            f"a Tune experiment exists at {url(layout.tune)} without its {path.name}; delete "
            f"{url(layout.root)} to start the sweep again",
            where=url(layout.tune),
        )
    old = read_json(path)
    if old.get("key") != settings["key"]:
        raise ConfigError(
            f"this run already holds a sweep with other settings (teacher {old.get('teacher')}, "
            f"space {old.get('space')}); resume it with the same config, or use another "
            f"--run-name (or delete {layout.root})",
            where="run.name",
        )


def expected_trials(cfg: Config, specs: Sequence[ParamSpec]) -> int:
    """Trials the sweep makes: ``sweep.samples`` times the size of the ``grid`` keys' product."""
    size = 1
    for spec in specs:
        if spec.distribution == "grid":
            size *= len(spec.args)
    return cfg.sweep.samples * size


def run_sweep(
    cfg: Config,
    *,
    checkpoint: str | None = None,
    storage: str | os.PathLike[str] | None = None,
    ui: PipelineUI | None = None,
) -> SweepOutcome:
    """Run (or resume) the sweep of ``cfg.sweep`` in run ``cfg.run.name``; see the module docstring.

    Args:
        cfg: the resolved config (``run.name`` set, ``sweep.space`` not empty).
        checkpoint: the teacher (checkpoint, run directory or run name); None = the run's own
            teacher, trained first when the run has none.
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        ui: console output (default: stdout).

    Raises:
        ConfigError: an empty or invalid search space, a teacher trained on other windows, or a
            run holding a sweep with other settings.
    """
    from stkd_dist.config.validate import validate_config
    from stkd_dist.pipeline.sweep_tuner import build_tuner, max_concurrent, trial_outcomes
    from stkd_dist.report import write_report
    from stkd_dist.train.loop import build_reader

    ui = ui or PipelineUI()
    echo = ui.echo
    started = time.time()
    specs = check_space(cfg)
    if not specs:
        raise ConfigError(
            "is empty: name the settings to sweep, e.g. "
            "{distill.alpha: {uniform: [0.2, 0.9]}, student.optim.lr: {loguniform: [1e-4, 1e-2]}}",
            where="sweep.space",
        )
    check_forecast_loss(cfg, specs)
    if cfg.teacher.dataset is not None:
        raise ConfigError(
            "a sweep distils a teacher of data.dataset: transfer one with `stkd distill "
            "--teacher-data` and give its teacher_transfer/checkpoint with --checkpoint",
            where="teacher.dataset",
        )
    validate_config(cfg, roles=("student",) if checkpoint else ("teacher", "student"))
    if cfg.sweep.labels == "stream" and cfg.serve.endpoints:
        raise ConfigError(
            "a sweep streams its labels from teacher replicas it starts (they write through to "
            "the run's label cache); drop serve.endpoints, or set sweep.labels: cache",
            where="serve.endpoints",
        )
    # the stage lines and Tune's own table say what happens; the workers' chatter stays in
    # the Ray session's logs
    ray = RaySession(cfg, worker_logs=False, sweep=True)
    graph = StageGraph(cfg, storage, ui, sweep_stages(cfg), ray)
    run = graph.layout
    layout = SweepLayout.of(run)
    store = graph.dataset()
    reader = build_reader(cfg, store)  # checks channels and windows; computes + caches statistics
    for split in ("train", "val", "test"):
        if len(reader.windows(split)) == 0:
            raise ConfigError(f"the {split} split has no windows", where="data.split")

    with ray:
        teacher = graph.teacher() if checkpoint is None else graph.given_teacher(checkpoint)
        tpath = absolute(teacher.path(run))
        _check_teacher_data(read_checkpoint(tpath).config, cfg, where=url(tpath))
        cache = graph.labels(teacher, LABEL_SPLITS) if cfg.sweep.labels == "cache" else None

        settings = _settings(cfg, teacher.version)
        if exists(layout.tune):
            _check_settings(layout, settings)
        makedirs(layout.root)
        write_json_atomic(layout.settings, settings)
        write_config(cfg, layout.root / "config.yaml")

        where = ray.ensure()
        concurrent = max_concurrent(cfg)
        graph.header("trials", f"{cfg.sweep.scheduler.upper()}, labels: {cfg.sweep.labels}")
        labels = trial_labels(cfg, run, teacher, store.path, reader, cache, storage)
        with labels as trial_teacher:
            echo(f"soft labels: {trial_teacher.teacher.name} (teacher {teacher.version})")
            job = TrialJob(
                config=cfg,
                specs=specs,
                dataset=url(store.path),
                records=url(layout.trials),
                teacher=trial_teacher.teacher,
                fingerprint=store.fingerprint,
                workers=cfg.sweep.trial_workers,
                cpus_per_worker=cfg.sweep.cpus_per_worker,
                gpus_per_worker=cfg.sweep.gpus_per_worker,
            )
            tuner, resumed = build_tuner(cfg, job, layout, specs)
            echo(
                f"{'resuming' if resumed else 'starting'} sweep {cfg.run_name!r}: "
                f"{cfg.sweep.samples} trial(s), up to {cfg.sweep.max_epochs} epochs each, "
                f"{concurrent} at a time on {where} ({cfg.sweep.scheduler.upper()})"
            )
            results = tuner.fit()
        finished = results.num_terminated + results.num_errors
        if finished < len(results):
            echo(
                f"sweep interrupted ({finished}/{len(results)} trials finished); run the same "
                "command again to resume it"
            )
            return SweepOutcome(layout, (), None, {}, resumed, True)
        expected = expected_trials(cfg, specs)
        if len(results) < expected:
            # Tune saves its trial list and its searcher's state as two files; a driver killed
            # between the two uploads restores a searcher that already made a trial the list
            # lacks, so that trial is never run. Say so rather than report a smaller sweep.
            echo(
                f"warning: the sweep has {len(results)} of its {expected} trial(s): Tune's saved "
                "state of the interrupted run lacked the others (the driver was killed while "
                "it was being saved)"
            )

    graph.header("aggregate")
    rows, counts = collect_rows(results, specs, reader, cfg.data.eval_batch_size, echo, layout.tune)
    if not rows:
        raise StkdError(
            f"no trial produced a checkpoint ({counts['errored']} failed); see the trial logs "
            f"in {layout.tune}",
            where="sweep",
        )
    best = rows[0]
    front = pareto_rows(rows)
    makedirs(layout.root)
    test = {"mae": best.test_mae, "rmse": best.test_rmse, "mape": best.test_mape}
    export_best(best, layout, test)
    # beyond selection: the greedy weight soup and the top-k ensemble, on the leaderboard as
    # rows `soup` and `ensemble`, exported next to the best trial
    agg = aggregate(rows, reader, cfg.data.eval_batch_size, layout, cfg.sweep.ensemble_size, echo)
    board = [*(r.record(layout.root) for r in rows), *agg.rows(layout.root)]
    write_csv(pd.DataFrame(board), layout.leaderboard)
    write_csv(pd.DataFrame([r.record(layout.root) for r in front]), layout.pareto)
    update_run_metrics(run, reader, cfg, layout.best, tpath)

    distinct = int(sum(len(reader.windows(s)) for s in LABEL_SPLITS))
    label_cost = trial_teacher.summary(distinct, counts["label_reads"])
    summary = {
        "run": cfg.run_name,
        "trials": counts["trials"],
        "trials_expected": expected,
        "evaluated": len(rows),
        "errored": counts["errored"],
        **trial_outcomes(cfg, specs, results, layout),
        "space": {s.key: s.describe() for s in specs},
        "samples": cfg.sweep.samples,
        "max_epochs": cfg.sweep.max_epochs,
        "max_concurrent": concurrent,
        "max_failures": cfg.sweep.max_failures,
        "teacher": {"checkpoint": url(tpath), "version": teacher.version},
        "labels": {**label_cost, "splits": list(LABEL_SPLITS)},
        # what the teacher computed for the whole sweep, against the windows the trials read
        "teacher_windows_computed": label_cost["teacher_windows_computed"],
        "distinct_windows": distinct,
        "best": {**best.record(layout.root), "exported": relative(layout.best, run.root)},
        "pareto": [r.trial for r in front],
        "aggregates": agg.summary(layout.root),
        "resumed": resumed,
        "seconds": time.time() - started,
    }
    write_json_atomic(layout.summary, json_safe(summary))
    write_report(run.root)
    return SweepOutcome(layout, tuple(rows), best, summary, resumed, False)


def sweep_stages(cfg: Config) -> list[str]:
    """The stages of ``stkd sweep``: the shared ones, then the trials and their aggregation."""
    labels = ["labels"] if cfg.sweep.labels == "cache" else []
    return ["dataset", "teacher", *labels, "trials", "aggregate"]


__all__ = [
    "LABEL_SPLITS",
    "SweepLayout",
    "SweepOutcome",
    "TrialRow",
    "collect_rows",
    "export_best",
    "pareto_rows",
    "run_sweep",
]
