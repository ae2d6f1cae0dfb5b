"""Teacher training on Ray Train: the driver side of ``stkd train-teacher``.

:func:`train_teacher` validates the config, opens the store and computes the training statistics
once (cached in the store, so workers only read them), then runs a ``TorchTrainer`` whose workers
execute :func:`stkd_dist.train.worker.run_worker` with the masked MAE loss. The run lives in
``<storage>/runs/<run>/``; the Ray experiment is ``<run>/teacher/`` with one ``epoch_NNNN``
checkpoint per kept epoch, ``history.jsonl`` and, after training, ``best.json``.

Resuming: Ray Train restores a run from its storage when the experiment name matches, so
re-running the same run name continues from the latest checkpoint (``ray.train.get_checkpoint()``
in the workers); after a worker failure (``cluster.max_failures > 0``) Ray restarts the worker
group from the latest checkpoint in the same way. A run that already finished is not trained
again: its best checkpoint is reported instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stkd_dist.config import Config, write_config
from stkd_dist.config.validate import validate_config
from stkd_dist.data.batch import WindowBatch
from stkd_dist.errors import ConfigError
from stkd_dist.location import PathInput
from stkd_dist.train.experiment import (
    TrainOutcome,
    existing_outcome,
    fit,
    open_experiment,
    trained_outcome,
)
from stkd_dist.train.loop import LossFn, LossValue, TrainJob, WorkerContext
from stkd_dist.train.ray_session import ray_cluster

EXPERIMENT = "teacher"


def masked_mae_loss(ctx: WorkerContext) -> LossFn:
    """The teacher's training loss: MAE over observed targets, in original units."""
    from stkd_dist.distill.criteria import build_criterion

    mae = build_criterion("mae")

    def loss(batch: WindowBatch, pred: torch.Tensor) -> LossValue:
        # padding samples have an all-False mask: weight 0, they add nothing
        return LossValue(mae(pred, batch.y, batch.mask), batch.mask.sum())

    return loss


def train_teacher(
    cfg: Config,
    *,
    storage: PathInput | None = None,
    echo: Callable[[str], None] = print,
    experiment: str = EXPERIMENT,
    init_weights: str | None = None,
) -> TrainOutcome:
    """Train (or resume, or report) the teacher of ``cfg`` on Ray Train.

    Args:
        cfg: the resolved config (``run.name`` set).
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        echo: where status lines go.
        experiment: the experiment's name in the run directory (``stkd update`` fine-tunes
            into ``teacher_update<k>``).
        init_weights: a checkpoint whose weights a new run starts from (a fine-tune).
    """
    if cfg.teacher.dataset is not None:
        raise ConfigError(
            "train-teacher trains on data.dataset: set data.dataset to the dataset to train on "
            "(teacher.dataset is for `stkd distill`, which then transfers the teacher)",
            where="teacher.dataset",
        )
    validate_config(cfg, roles=("teacher",), distill=False)
    exp = open_experiment(cfg, experiment, storage)
    done = existing_outcome(exp, cfg, "teacher", echo)
    if done is not None:
        return done
    # the run's config, beside the experiments; a fine-tune's own lies in its experiment
    write_config(cfg, exp.run / "config.yaml" if init_weights is None else exp.path / "config.yaml")

    job = TrainJob(
        config=cfg,
        role="teacher",
        experiment=experiment,
        dataset=str(exp.dataset),
        make_loss=masked_mae_loss,
        experiment_dir=str(exp.path),
        init_weights=init_weights,
    )
    c = cfg.cluster
    with ray_cluster(c) as where:
        echo(
            f"training teacher {cfg.teacher.model!r} on {exp.store.name} with {c.describe_workers()} "
            f"worker(s) ({'GPU, nccl' if c.use_gpu else 'CPU, gloo'}) on {where}"
        )
        fit(job, exp.run, cfg.teacher.schedule.epochs)
    return trained_outcome(exp, cfg, "teacher")
