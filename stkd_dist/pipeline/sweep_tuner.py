"""The Ray Tune side of ``stkd sweep``: the Tuner, its scheduler, checkpoints and retries, and
what ``summary.json`` says of the trials (:func:`trial_outcomes`).

``sweep.scheduler`` picks the trial scheduler, both counting time in epochs
(:data:`~stkd_dist.pipeline.tune_trial.TIME_ATTR`) and ranking trials by validation MAE:

* ``asha``: :class:`RecordingASHA`, Tune's ASHA that also records each trial it stops in that
  trial's records (so a trial's stop reason is read, not guessed from its epoch count);
* ``pbt``: Tune's ``PopulationBasedTraining``: every ``sweep.perturbation_interval`` epochs a
  trial in the bottom quarter continues from the latest checkpoint of one in the top quarter,
  with that trial's settings mutated (:func:`pbt_mutations`: continuous and integer keys are
  multiplied by 0.8 or 1.2 or drawn again, then kept inside their bounds by :class:`KeepInBounds`;
  listed keys move to a neighbouring value or are drawn again). Architecture keys are never
  mutated: the exploiting trial takes the donor's, with its weights.

With PBT every checkpoint is kept (:func:`checkpoint_config`): Tune hands the exploiting trial the
donor's latest checkpoint when it is scheduled again, by which time the donor may have written
newer ones, and pruning by validation MAE would delete that one first.

Ray is imported with this module: :mod:`stkd_dist.pipeline.sweep` imports it where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining, TrialScheduler

from stkd_dist.config import Config
from stkd_dist.config.sweep import INTEGER, LISTED, ParamSpec, is_architecture_key
from stkd_dist.location import location, pyarrow_filesystem, ray_location, relative
from stkd_dist.pipeline.sweep_results import METRIC, SweepLayout, trial_id_of
from stkd_dist.pipeline.trial_records import (
    STOP_REASONS,
    TRIAL_DIR_PREFIX,
    trial_summary,
    write_scheduler_stop,
)
from stkd_dist.pipeline.tune_space import plain, to_tune
from stkd_dist.pipeline.tune_trial import TIME_ATTR, TrialJob, run_trial


def max_concurrent(cfg: Config) -> int:
    """Trials at once: ``sweep.max_concurrent``, else 0 (no cap).

    Without a cap the cluster's resources decide, as they change: Tune starts a pending trial
    when its CPUs and GPUs are free and an autoscaler sees the pending trials' demand, so a
    cluster that starts with no workers grows its sweep as nodes join. A number computed from
    the resources at start would fix the sweep at that size.
    """
    return cfg.sweep.max_concurrent or 0


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (``trial_<id>``) instead of Tune's long ones."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def pbt_mutations(specs: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: each swept key but the architecture's, as drawn."""
    domains = to_tune(specs)
    out: dict[str, Any] = {}
    for spec in specs:
        if is_architecture_key(spec.key):
            continue
        out[spec.key] = list(spec.args) if spec.distribution in LISTED else domains[spec.key]
    return out


@dataclass(frozen=True)
class KeepInBounds:
    """PBT's ``custom_explore_fn``: mutated values back inside their distribution's bounds.

    PBT multiplies a continuous value by 0.8 or 1.2, which can leave its range (``distill.alpha``
    0.85 * 1.2 > 1, an invalid config). Values are clamped to ``[low, high]`` (integers to
    ``[low, high - 1]``) and ``quniform`` ones rounded to a multiple of ``q``. Picklable: Tune
    keeps the scheduler in its experiment state.
    """

    specs: tuple[ParamSpec, ...]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for spec in self.specs:
            if spec.distribution in LISTED or spec.key not in out or is_architecture_key(spec.key):
                continue
            lo, hi = spec.args[0], spec.args[1]
            value = float(plain(out[spec.key]))
            if spec.distribution == "quniform":
                value = round(value / spec.args[2]) * spec.args[2]
            if spec.distribution in INTEGER:
                out[spec.key] = int(min(max(round(value), lo), hi - 1))
            else:
                out[spec.key] = min(max(value, float(lo)), float(hi))
        return out


class RecordingASHA(ASHAScheduler):
    """Tune's ASHA, which also records each trial it stops before ``max_t`` in its records."""

    def __init__(self, records: str, **kwargs: Any) -> None:
        """``records``: the trials' records folder; ``kwargs``: ``ASHAScheduler``'s."""
        super().__init__(**kwargs)
        self._records = records

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        done = result.get(self._time_attr)
        # at max_t ASHA stops every trial: its bookkeeping, the trial has completed by then
        if action == TrialScheduler.STOP and done is not None and done < self._max_t:
            write_scheduler_stop(location(self._records) / trial.trial_id, "asha", int(done))
        return action


def build_scheduler(cfg: Config, specs: tuple[ParamSpec, ...], records: str) -> Any:
    """The trial scheduler of ``sweep.scheduler`` (``records``: the trials' records folder)."""
    s = cfg.sweep
    settings = s.scheduler_settings
    if s.scheduler == "asha":
        return RecordingASHA(
            records,
            time_attr=TIME_ATTR,
            max_t=s.max_epochs,
            grace_period=settings["grace_period"],
            reduction_factor=settings["reduction_factor"],
        )
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        perturbation_interval=settings["perturbation_interval"],
        hyperparam_mutations=pbt_mutations(specs),
        custom_explore_fn=KeepInBounds(specs),
    )


def scheduler_summary(cfg: Config, specs: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """The ``scheduler`` entry of ``summary.json`` (without its decisions)."""
    s = cfg.sweep
    out: dict[str, Any] = {"name": s.scheduler, "time_attr": TIME_ATTR, **s.scheduler_settings}
    if s.scheduler == "pbt":
        mutable = [spec for spec in specs if not is_architecture_key(spec.key)]
        out["hyperparam_mutations"] = {spec.key: spec.describe() for spec in mutable}
    return out


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial's Tune actor reserves.

    A one-process trial reserves its worker's CPUs and GPUs. A data-parallel trial's actor only
    drives its Ray Train run, whose workers Ray Train places in a placement group of their
    own; reserving them for the actor as well would hold each trial's resources twice. Ray
    refuses a reservation of nothing, and any CPU fraction would leave a whole worker's CPU
    unusable on a cluster the workers fill exactly: the actor reserves one byte of memory.
    """
    s = cfg.sweep
    if s.trial_workers == 1:
        return {"cpu": s.cpus_per_worker, "gpu": s.gpus_per_worker}
    return {"cpu": 0, "memory": 1}


def checkpoint_config(cfg: Config) -> Any:
    """Which checkpoints each trial keeps: the best ``sweep.keep_best`` (ASHA), or all (PBT)."""
    from ray import tune

    keep = None if cfg.sweep.scheduler == "pbt" else cfg.sweep.keep_best
    return tune.CheckpointConfig(
        num_to_keep=keep, checkpoint_score_attribute=METRIC, checkpoint_score_order="min"
    )


def failure_config(cfg: Config) -> Any:
    """A crashed trial restarts from its latest checkpoint ``sweep.max_failures`` times; then
    it is recorded as failed and the sweep goes on without it (never fail-fast)."""
    from ray import tune

    return tune.FailureConfig(max_failures=cfg.sweep.max_failures, fail_fast=False)


def build_tuner(
    cfg: Config, job: TrialJob, layout: SweepLayout, specs: tuple[ParamSpec, ...]
) -> tuple[Any, bool]:
    """A new Tuner, or the restored one of an interrupted sweep: ``(tuner, restored)``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = cfg.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), trial_resources(cfg))
    # Tune keeps its experiment through pyarrow.fs: the run's storage root, local or remote
    tune_filesystem, tune_path = pyarrow_filesystem(layout.tune)
    tune_storage = tune_path.rsplit("/", 1)[0]
    if tune.Tuner.can_restore(tune_path, storage_filesystem=tune_filesystem):
        # finished trials are kept as they are; unfinished and errored ones continue from their
        # latest checkpoint
        restored = tune.Tuner.restore(
            tune_path, trainable, resume_errored=True, storage_filesystem=tune_filesystem
        )
        return restored, True
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune(specs),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            num_samples=s.samples,
            scheduler=build_scheduler(cfg, specs, job.records),
            # random search seeded by run.seed; the generator limits the trials at once itself
            # (Tune ignores max_concurrent_trials when it is handed a generator)
            search_alg=BasicVariantGenerator(
                max_concurrent=max_concurrent(cfg), random_state=cfg.run.seed
            ),
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
            # a data-parallel trial's actor must end with the trial: its Ray Train run (the
            # controller, the workers, their placement group) is fate-shared with it
            reuse_actors=s.trial_workers == 1,
        ),
        run_config=tune.RunConfig(
            name=layout.tune.name,
            storage_path=tune_storage,
            storage_filesystem=tune_filesystem,
            checkpoint_config=checkpoint_config(cfg),
            failure_config=failure_config(cfg),
        ),
    )
    return tuner, False


def trial_outcomes(
    cfg: Config, specs: tuple[ParamSpec, ...], results: Any, layout: SweepLayout
) -> dict[str, Any]:
    """``stop_reasons`` (trials per reason), ``scheduler`` (its settings and decisions) and
    ``trial_records`` (per trial: stop reason, epochs, worker processes, starts) of
    ``summary.json``, from the trials' own records (:mod:`.trial_records`)."""
    records = []
    for result in results:
        trial = trial_id_of(result)
        done = result.metrics.get(TIME_ATTR) if result.metrics else None
        failed = result.error is not None
        records.append(trial_summary(trial, layout.trials / trial, failed, done))
    reasons = {reason: 0 for reason in STOP_REASONS}
    for record in records:
        reasons[record["stop_reason"]] += 1
    if not reasons["unknown"]:
        del reasons["unknown"]
    scheduler = scheduler_summary(cfg, specs)
    exploits = [e for r in records for e in r.pop("exploits")]
    for e in exploits:  # as written by Ray: relative to the sweep's folder here
        if e["checkpoint"]:
            e["checkpoint"] = relative(ray_location(e["checkpoint"], layout.tune), layout.root)
    if cfg.sweep.scheduler == "pbt":
        scheduler["exploits"] = sorted(exploits, key=lambda e: (e["epoch"] or 0, e["trial"]))
    else:
        scheduler["stopped"] = [r["trial_id"] for r in records if r["stop_reason"] == "scheduler"]
    return {"stop_reasons": reasons, "scheduler": scheduler, "trial_records": records}
