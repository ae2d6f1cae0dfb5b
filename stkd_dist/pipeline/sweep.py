"""``stkd sweep``: a Ray Tune sweep of student and distillation settings over one shared teacher.

Stages (each reuses what an earlier call left, see :mod:`stkd_dist.pipeline.stages`):

1. **Teacher.** The checkpoint given (``--checkpoint``), else the run's teacher, trained (or just
   found complete) by the same code as ``stkd distill``'s teacher stage.
2. **Labels, once.** The teacher runs over every training window into the run's label cache
   (``<run>/labels/<teacher version>.zarr``); an existing complete cache is reused. Trials only
   read it, so the sweep costs as many teacher forward passes as there are distinct windows,
   however many trials and epochs read them.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stkd_dist.config import Config, write_config
from stkd_dist.config.sweep import ParamSpec
from stkd_dist.errors import ConfigError, StkdError, StoreError
from stkd_dist.labels.replicas import replica_compute
from stkd_dist.location import (
    Location,
    absolute,
    exists,
    makedirs,
    read_json,
    relative,
    url,
    write_json_atomic,
)
from stkd_dist.pipeline.run import RunLayout, config_digest
from stkd_dist.pipeline.sweep_aggregate import aggregate
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

log = logging.getLogger(__name__)

Echo = Callable[[str], None]
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


@dataclass(frozen=True)
class SweepHooks:
    """Progress callbacks of :func:`run_sweep` (all optional).

    Attributes:
        echo: status lines.
        cache_start: called with the number of windows when the label cache is being computed.
        cache_progress: called with the windows labelled after each teacher forward pass.
    """

    echo: Echo = print
    cache_start: Callable[[int], None] | None = None
    cache_progress: Callable[[int], None] | None = None


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


def cache_teacher(cache: Location, reader: Any, cfg: Config, val_mae: float | None) -> Any:
    """The label cache as a ``cache`` teacher of the student trainer, checked and pinned.

    The check (:func:`~stkd_dist.labels.sources.resolve_teachers`) runs once on the driver: the
    cache must hold every training window of the student, with the student's label shape.
    """
    from stkd_dist.labels.teachers import TeacherSpec, resolve_teachers

    dims = reader.dims
    (teacher,) = resolve_teachers(
        [TeacherSpec("cache", str(cache), val_mae=val_mae)],
        fingerprint=reader.store.fingerprint,
        window_shape=(dims.horizon, dims.nodes, dims.out_channels),
        windows=reader.windows("train"),
        spread=cfg.distill.confidence_weighting,
    )
    return teacher


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


def _resolve_teacher(
    cfg: Config, checkpoint: str | None, storage: str | os.PathLike[str] | None, echo: Echo
) -> Location:
    """The teacher checkpoint: the one given, else the run's (trained here when missing)."""
    from stkd_dist.checkpoint import resolve_checkpoint
    from stkd_dist.pipeline.stages import train_teacher_stage

    if checkpoint is not None:
        return absolute(resolve_checkpoint(checkpoint, "teacher", storage))
    return absolute(train_teacher_stage(cfg, storage=storage, echo=echo).checkpoint)


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
    hooks: SweepHooks | None = None,
) -> SweepOutcome:
    """Run (or resume) the sweep of ``cfg.sweep`` in run ``cfg.run.name``; see the module docstring.

    Args:
        cfg: the resolved config (``run.name`` set, ``sweep.space`` not empty).
        checkpoint: the teacher (checkpoint, run directory or run name); None = the run's own
            teacher, trained first when the run has none.
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        hooks: progress callbacks.

    Raises:
        ConfigError: an empty or invalid search space, a teacher trained on other windows, or a
            run holding a sweep with other settings.
    """
    from stkd_dist.checkpoint import read_checkpoint
    from stkd_dist.config.validate import validate_config
    from stkd_dist.pipeline.stages import (
        RaySession,
        ensure_dataset,
        ensure_label_cache,
        label_cache_path,
    )
    from stkd_dist.pipeline.sweep_tuner import build_tuner, max_concurrent, trial_outcomes
    from stkd_dist.report import write_report
    from stkd_dist.train.loop import build_reader

    hooks = hooks or SweepHooks()
    echo = hooks.echo
    started = time.time()
    specs = check_space(cfg)
    if not specs:
        raise ConfigError(
            "is empty: name the settings to sweep, e.g. "
            "{distill.alpha: {uniform: [0.2, 0.9]}, student.optim.lr: {loguniform: [1e-4, 1e-2]}}",
            where="sweep.space",
        )
    check_forecast_loss(cfg, specs)
    validate_config(cfg, roles=("student",) if checkpoint else ("teacher", "student"))
    run = RunLayout.of(cfg.run_name, storage)
    layout = SweepLayout.of(run)
    store, _ = ensure_dataset(cfg, storage)
    reader = build_reader(cfg, store)  # checks channels and windows; computes + caches statistics
    for split in ("train", "val", "test"):
        if len(reader.windows(split)) == 0:
            raise ConfigError(f"the {split} split has no windows", where="data.split")

    with RaySession(cfg) as session:
        if checkpoint is None:
            session.ensure()  # the teacher stage trains on Ray Train
        teacher = _resolve_teacher(cfg, checkpoint, storage, echo)
        tinfo = read_checkpoint(teacher)
        _check_teacher_data(tinfo.config, cfg, where=str(teacher))
        echo(f"teacher {tinfo.version} ({teacher})")
        cache = ensure_label_cache(
            teacher,
            store.path,
            label_cache_path(run, tinfo.version),
            LABEL_SPLITS,
            batch_size=cfg.serve.batch_size,
            compute=replica_compute(cfg.serve),
            progress=hooks.cache_progress,
            on_start=hooks.cache_start,
        )
        echo(
            f"labels: {sum(cache.windows.values())} windows in {cache.path} "
            f"({'computed now' if cache.computed else 'reused'}; "
            f"{cache.forward_windows} teacher forward passes)"
        )

        settings = _settings(cfg, tinfo.version)
        if exists(layout.tune):
            _check_settings(layout, settings)
        makedirs(layout.root)
        write_json_atomic(layout.settings, settings)
        write_config(cfg, layout.root / "config.yaml")

        job = TrialJob(
            config=cfg,
            specs=specs,
            dataset=url(store.path),
            records=url(layout.trials),
            teacher=cache_teacher(absolute(cache.path), reader, cfg, tinfo.val_mae),
            fingerprint=store.fingerprint,
            workers=cfg.sweep.trial_workers,
            cpus_per_worker=cfg.sweep.cpus_per_worker,
            gpus_per_worker=cfg.sweep.gpus_per_worker,
        )
        where = session.ensure()
        concurrent = max_concurrent(cfg)
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
    update_run_metrics(run, reader, cfg, layout.best, teacher)

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
        "teacher": {"checkpoint": url(teacher), "version": tinfo.version},
        "labels": {
            "cache": url(cache.path),
            "splits": list(LABEL_SPLITS),
            "distinct_windows": int(sum(len(reader.windows(s)) for s in LABEL_SPLITS)),
            # recorded in the cache when it was filled: what the teacher cost, once for all trials
            "teacher_windows_computed": cache.forward_windows,
            "computed_by_this_sweep": cache.computed,
            # labelled windows the trials consumed (every epoch of every trial)
            "trial_label_reads": counts["label_reads"],
        },
        "best": {**best.record(layout.root), "exported": relative(layout.best, run.root)},
        "pareto": [r.trial for r in front],
        "aggregates": agg.summary(layout.root),
        "resumed": resumed,
        "seconds": time.time() - started,
    }
    write_json_atomic(layout.summary, json_safe(summary))
    write_report(run.root)
    return SweepOutcome(layout, tuple(rows), best, summary, resumed, False)


__all__ = [
    "LABEL_SPLITS",
    "SweepHooks",
    "SweepLayout",
    "SweepOutcome",
    "TrialRow",
    "collect_rows",
    "export_best",
    "pareto_rows",
    "run_sweep",
]
