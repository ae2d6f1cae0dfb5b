"""Teacher training on Ray Train: the driver side of ``stkd train-teacher``.

:func:`train_teacher` validates the config, opens the store and computes the training statistics
once (cached in the store, so workers only read them), then runs a ``TorchTrainer`` whose workers
execute :func:`stkd_dist.train.loop.run_worker` with the masked MAE loss. The run lives in
``<storage>/runs/<run>/``; the Ray experiment is ``<run>/teacher/`` with one ``epoch_NNNN``
checkpoint per kept epoch, ``history.jsonl`` and, after training, ``best.json``.

Resuming: Ray Train restores a run from its storage when the experiment name matches, so
re-running the same run name continues from the latest checkpoint (``ray.train.get_checkpoint()``
in the workers); after a worker failure (``cluster.max_failures > 0``) Ray restarts the worker
group from the latest checkpoint in the same way. A run that already finished is not trained
again: its best checkpoint is reported instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stkd_dist.config import Config, write_config
from stkd_dist.config.validate import validate_config
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.paths import resolve_dataset, run_dir
from stkd_dist.storage import open_store
from stkd_dist.train.checkpoint import CheckpointInfo, list_checkpoints, read_checkpoint, write_best
from stkd_dist.train.loop import LossFn, LossValue, TrainJob, WorkerContext, build_reader
from stkd_dist.train.ray_session import EpochReporter, ray_cluster, read_history

log = logging.getLogger(__name__)

EXPERIMENT = "teacher"


def masked_mae_loss(ctx: WorkerContext) -> LossFn:
    """The teacher's training loss: MAE over observed targets, in original units."""
    from stkd_dist.distill.criteria import build_criterion

    mae = build_criterion("mae")

    def loss(batch, pred):  # type: ignore[no-untyped-def]
        # padding samples have an all-False mask: weight 0, they add nothing
        return LossValue(mae(pred, batch.y, batch.mask), batch.mask.sum())

    return loss


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
    experiment: Path
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


def finish(experiment: Path, cfg: Config, role: str = "teacher") -> CheckpointInfo:
    """Write ``best.json`` for the best complete checkpoint of ``experiment`` and return it.

    ``role`` is the config section whose ``schedule.epochs`` says when the run is complete.
    """
    done = [i for i in list_checkpoints(experiment) if i.val_mae is not None]
    if not done:
        raise StoreError("no complete checkpoint was written", where=str(experiment))
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


def fit(job: TrainJob, run: Path, epochs: int) -> None:
    """Run ``job`` on Ray Train: ``cluster.num_workers`` DDP workers executing ``run_worker``.

    The Ray experiment ``<run>/<job.experiment>`` keeps the best ``run.keep_best`` checkpoints by
    validation MAE plus the latest; a failed worker group restarts from the latest checkpoint up
    to ``cluster.max_failures`` times. Call it inside :func:`ray_cluster`; ``epochs`` is for the
    progress lines.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stkd_dist.train.loop import worker_entry

    cfg, c = job.config, job.config.cluster
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=job.experiment,
            storage_path=str(run),
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_best,  # plus the latest, which Ray always keeps
                checkpoint_score_attribute="val_mae",
                checkpoint_score_order="min",
            ),
            callbacks=[EpochReporter(job.experiment_dir, epochs)],
        ),
    )
    trainer.fit()


def train_teacher(
    cfg: Config,
    *,
    storage: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> TrainOutcome:
    """Train (or resume, or report) the teacher of ``cfg`` on Ray Train.

    Args:
        cfg: the resolved config (``run.name`` set).
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        echo: where status lines go.
    """
    validate_config(cfg, roles=("teacher",), distill=False)
    dataset = resolve_dataset(cfg.data.dataset, storage).absolute()
    store = open_store(dataset)
    reader = build_reader(cfg, store)  # checks channels and windows, computes + caches statistics
    for split in ("val", "train"):
        n = len(reader.windows(split))
        if n < cfg.cluster.num_workers:
            raise ConfigError(
                f"the {split} split has {n} windows, fewer than {cfg.cluster.num_workers} "
                "workers; use fewer workers or a larger split",
                where="cluster.num_workers",
            )
    run = run_dir(cfg.run_name, storage).absolute()
    experiment = run / EXPERIMENT
    epochs = cfg.teacher.schedule.epochs

    existing = list_checkpoints(experiment) if experiment.is_dir() else []
    if existing:
        latest = existing[-1]
        check_resumable(latest, cfg, store.fingerprint, "teacher")
        if is_complete(latest, epochs):
            best = finish(experiment, cfg)
            echo(
                f"run {cfg.run_name!r} is complete ({latest.epoch + 1} epochs"
                f"{', stopped early' if latest.state.stopped_early else ''}); not training again"
            )
            return TrainOutcome(
                best, experiment, latest.epoch + 1, False, latest.state.stopped_early, 0
            )
        echo(f"resuming run {cfg.run_name!r} after epoch {latest.epoch + 1}/{epochs}")
    write_config(cfg, run / "config.yaml")

    job = TrainJob(
        config=cfg,
        role="teacher",
        experiment=EXPERIMENT,
        dataset=str(dataset),
        make_loss=masked_mae_loss,
        experiment_dir=str(experiment),
    )
    c = cfg.cluster
    with ray_cluster(c) as where:
        echo(
            f"training teacher {cfg.teacher.model!r} on {store.name} with {c.num_workers} "
            f"worker(s) ({'GPU, nccl' if c.use_gpu else 'CPU, gloo'}) on {where}"
        )
        fit(job, run, epochs)

    best = finish(experiment, cfg)
    history = read_history(experiment)
    last = history[-1] if history else {}
    latest = list_checkpoints(experiment)[-1]
    return TrainOutcome(
        best=best,
        experiment=experiment,
        epochs_done=latest.epoch + 1,
        trained=True,
        stopped_early=latest.state.stopped_early,
        attempts=int(last.get("attempt", 0)),
    )
