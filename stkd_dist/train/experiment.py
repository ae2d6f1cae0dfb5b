"""One training experiment's lifecycle, shared by the teacher and the students.

A training command (``train-teacher``, ``train-student``) does the same around its own loss:

1. :func:`open_experiment`: validate what the workers will need before any Ray worker starts
   (the store opens, the reader's statistics are computed and cached in the store, every split has
   a window for every worker);
2. :func:`existing_outcome`: when the experiment already has checkpoints, refuse to continue it
   with another dataset or model (:func:`check_resumable`), report it when it is complete, or say
   that it resumes;
3. :func:`fit`: run Ray Train's ``TorchTrainer`` (``cluster.num_workers`` DDP workers);
4. :func:`trained_outcome`: write ``best.json`` (:func:`finish`) and report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from stkd_dist.checkpoint import (
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_best,
)
from stkd_dist.config import Config
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    absolute,
    exists,
    pyarrow_filesystem,
    read_text,
    url,
)
from stkd_dist.paths import resolve_dataset, run_dir
from stkd_dist.storage import DatasetStore, open_store
from stkd_dist.train.loop import TrainJob, build_reader
from stkd_dist.train.ray_session import EpochReporter, read_history
from stkd_dist.train.steps import SCORE

#: Ray Train's record of the checkpoints it registered, in the experiment folder
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class Experiment:
    """Where an experiment runs and what it reads.

    Attributes:
        dataset: the store's absolute path or URL (what the workers open).
        store: the opened store.
        reader: the window reader of the config's data section (statistics computed).
        run: the run directory ``<storage>/runs/<run name>``.
        path: the experiment directory ``<run>/<name>`` (Ray Train's experiment).
    """

    dataset: Location
    store: DatasetStore
    reader: WindowReader
    run: Location
    path: Location


def open_experiment(cfg: Config, name: str, storage: PathInput | None) -> Experiment:
    """Open the config's store and check that every worker gets windows of every split."""
    dataset = absolute(resolve_dataset(cfg.data.dataset, storage))
    store = open_store(dataset)
    reader = build_reader(cfg, store)  # checks channels and windows, computes + caches statistics
    for split in ("val", "train"):
        n = len(reader.windows(split))
        if n < cfg.cluster.max_workers:
            raise ConfigError(
                f"the {split} split has {n} windows, fewer than {cfg.cluster.max_workers} "
                "workers; use fewer workers or a larger split",
                where="cluster.num_workers",
            )
    run = absolute(run_dir(cfg.run_name, storage))
    return Experiment(dataset, store, reader, run, run / name)


@dataclass(frozen=True)
class TrainOutcome:
    """What a training command reports at the end.

    Attributes:
        best: the best checkpoint (lowest validation MAE).
        experiment: the experiment directory.
        epochs_done: epochs completed in total.
        trained: False when the run was already complete and nothing was trained.
        stopped_early: the run stopped before its last epoch (early stopping).
        attempts: restarts from a checkpoint in the last epoch's worker group (0 = none).
    """

    best: CheckpointInfo
    experiment: Location
    epochs_done: int
    trained: bool
    stopped_early: bool
    attempts: int


def is_complete(info: CheckpointInfo, epochs: int) -> bool:
    """Whether the checkpoint ends its run (last epoch reached, or stopped early)."""
    return info.state.stopped_early or info.epoch + 1 >= epochs


def check_resumable(latest: CheckpointInfo, cfg: Config, fingerprint: str, role: str) -> None:
    """Refuse to continue a run whose data or model differ from the config's."""
    old = latest.config
    if latest.fingerprint != fingerprint:
        raise ConfigError(
            f"run {cfg.run_name!r} was trained on a dataset with fingerprint "
            f"{latest.fingerprint}, the store now has {fingerprint}; use another --run-name",
            where="run.name",
        )
    # what shapes the model and its data must match; dataset naming, batch sizes, epochs,
    # optimiser and cluster settings may change between attempts
    same_data = (old.data.window(), old.data.splits(), old.data.input_channels) == (
        cfg.data.window(),
        cfg.data.splits(),
        cfg.data.input_channels,
    ) and (old.data.target_channels, old.data.per_node_stats) == (
        cfg.data.target_channels,
        cfg.data.per_node_stats,
    )
    same_model = (old.model(role).model, old.model(role).kwargs) == (
        cfg.model(role).model,
        cfg.model(role).kwargs,
    )
    if not (same_data and same_model):
        raise ConfigError(
            f"run {cfg.run_name!r} exists with a different data or {role} model config; "
            "use another --run-name to start a new run",
            where="run.name",
        )


def finish(experiment: Location, cfg: Config, role: str = "teacher") -> CheckpointInfo:
    """Write ``best.json`` for the best complete checkpoint of ``experiment`` and return it.

    ``role`` is the config section whose ``schedule.epochs`` says when the run is complete.
    """
    done = [i for i in list_checkpoints(experiment) if i.val_mae is not None]
    if not done:
        raise StoreError("no complete checkpoint was written", where=url(experiment))
    best = min(done, key=lambda i: (i.val_mae, i.epoch))
    best = read_checkpoint(best.path)  # verifies the files against meta.json
    latest = done[-1]
    write_best(
        experiment,
        best,
        epochs_done=latest.epoch + 1,
        stopped_early=latest.state.stopped_early,
        complete=is_complete(latest, cfg.model(role).schedule.epochs),
    )
    return best


def fit(job: TrainJob, run: Location, epochs: int) -> None:
    """Run ``job`` on Ray Train: ``cluster.num_workers`` DDP workers executing :func:`~stkd_dist.train.worker.run_worker`.

    With ``cluster.num_workers: {min, max}`` the run is elastic: Ray Train starts as many
    workers as the cluster has room for (at most ``max``), restarts the group on fewer when a
    worker's node is gone (at least ``min``) and on more when room returns.

    The Ray experiment ``<run>/<job.experiment>`` keeps the best ``run.keep_best`` checkpoints by
    validation MAE plus the latest; a failed worker group restarts from the latest checkpoint up
    to ``cluster.max_failures`` times. Call it inside :func:`ray_cluster`; ``epochs`` is for the
    progress lines.
    """
    from ray.train.torch import TorchConfig

    # Train V2's classes (what ``ray.train`` exports when V2 is enabled, Ray's default): its
    # ScalingConfig takes a (min, max) worker range and the elastic resize interval
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from stkd_dist.train.worker import worker_entry

    cfg, c = job.config, job.config.cluster
    # Ray Train writes checkpoints and its own state through pyarrow.fs: the same root (a local
    # folder or the object store, with the same endpoint) as everything else of the run
    filesystem, storage_path = pyarrow_filesystem(run)
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # elastic: Ray Train restarts the group on as many workers as fit, in [min, max]
            num_workers=(c.min_workers, c.max_workers) if c.elastic else c.max_workers,
            use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker},
            elastic_resize_monitor_interval_s=c.resize_interval_s,
        ),
        run_config=RunConfig(
            name=job.experiment,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_best,  # plus the latest, which Ray always keeps
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="min",
            ),
            callbacks=[EpochReporter(job.experiment_dir, epochs)],
        ),
    )
    trainer.fit()


def registered_latest(experiment: Location) -> str | None:
    """The folder name of the checkpoint Ray Train resumes ``experiment`` from, if it says.

    Read from Ray Train's checkpoint-manager snapshot (``latest_checkpoint_result``); None when
    there is none or its layout is not the one this Ray version writes.
    """
    path = experiment / RAY_SNAPSHOT
    try:
        if not exists(path):
            return None
        latest = json.loads(read_text(path)).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def existing_outcome(
    exp: Experiment, cfg: Config, role: str, echo: Callable[[str], None]
) -> TrainOutcome | None:
    """The outcome of an experiment that is already complete, else None (train or resume)."""
    # the newest checkpoint that verifies: a torn newer one (rank 0 killed while it was copied)
    # is skipped with a warning, and Ray resumes from the last one it registered, this one
    latest = latest_checkpoint(exp.path) if exists(exp.path) else None
    if latest is None:
        return None
    check_resumable(latest, cfg, exp.store.fingerprint, role)
    label = f"run {cfg.run_name!r} ({exp.path.name})"
    epochs = cfg.model(role).schedule.epochs
    if not is_complete(latest, epochs):
        # Ray resumes from the latest checkpoint it registered: a newer one may lie complete on
        # disk, written while the group failed and never registered (the report barrier broke)
        name = registered_latest(exp.path)
        if name is not None and name != latest.path.name:
            latest = next((c for c in list_checkpoints(exp.path) if c.path.name == name), latest)
        if latest.mid_epoch:
            at = f"at step {latest.state.epoch_step} of epoch {latest.epoch + 2}/{epochs}"
        else:
            at = f"after epoch {latest.epoch + 1}/{epochs}"
        echo(f"resuming {label} {at}")
        return None
    best = finish(exp.path, cfg, role)
    early = ", stopped early" if latest.state.stopped_early else ""
    echo(f"{label} is complete ({latest.epoch + 1} epochs{early}); not training again")
    return TrainOutcome(best, exp.path, latest.epoch + 1, False, latest.state.stopped_early, 0)


def trained_outcome(exp: Experiment, cfg: Config, role: str) -> TrainOutcome:
    """Write ``best.json`` after :func:`fit` and report the experiment."""
    best = finish(exp.path, cfg, role)
    history = read_history(exp.path)
    last = history[-1] if history else {}
    latest = list_checkpoints(exp.path)[-1]
    return TrainOutcome(
        best=best,
        experiment=exp.path,
        epochs_done=latest.epoch + 1,
        trained=True,
        stopped_early=latest.state.stopped_early,
        attempts=int(last.get("attempt", 0)),
    )
