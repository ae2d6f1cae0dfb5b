"""A teacher fine-tuned on its student's predictions: the teacher side of ``distill.rounds``.

Round ``r > 1`` of ``stkd distill`` refines the previous round's teacher with what its student
learned: the teacher starts from that teacher's best checkpoint (its weights; a fresh optimiser
and epoch count) and trains ``distill.feedback_epochs`` epochs on

    (1 - feedback) · task(teacher, targets) + feedback · match(teacher, student predictions)

which is the ``regression`` distillation loss with the roles swapped: the student's predictions
are read from a label cache of the student (computed once, like any teacher's labels) through
the same :class:`~stkd_dist.train.distill_loss.DistillLoss` and the same training loop as every
other trainer. The experiment is the round's own (``teacher_round<r>``) and resumes like any.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from stkd_dist.config import Config, write_config
from stkd_dist.config.models import DistillSection
from stkd_dist.config.validate import validate_config
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, resolve_teachers
from stkd_dist.location import PathInput, absolute, url
from stkd_dist.train.experiment import (
    TrainOutcome,
    existing_outcome,
    fit,
    open_experiment,
    trained_outcome,
)
from stkd_dist.train.loop import TrainJob
from stkd_dist.train.ray_session import ray_cluster
from stkd_dist.train.student import make_distill_loss


def feedback_config(cfg: Config) -> Config:
    """``cfg`` as the fine-tuning's config: the ``teacher`` section with
    ``distill.feedback_epochs`` epochs (no warm-up: it starts from trained weights), and a
    ``regression`` loss whose teacher term (the student's predictions) weighs ``feedback``."""
    d = cfg.distill
    schedule = dataclasses.replace(
        cfg.teacher.schedule, epochs=d.feedback_epochs, warmup_epochs=0, min_epochs=0
    )
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, schedule=schedule),
        distill=DistillSection(
            loss="regression",
            alpha=1.0 - d.feedback,
            task=d.task,
            rounds=d.rounds,
            feedback=d.feedback,
            feedback_epochs=d.feedback_epochs,
        ),
    )


def train_feedback_teacher(
    cfg: Config,
    *,
    start: PathInput,
    student_labels: PathInput,
    experiment: str,
    storage: PathInput | None = None,
    echo: Callable[[str], None] = print,
) -> TrainOutcome:
    """Fine-tune the teacher checkpoint ``start`` on the targets and a student's predictions.

    Args:
        cfg: the run's resolved config (``teacher`` and ``distill`` sections used).
        start: the teacher checkpoint whose weights the fine-tuning starts from.
        student_labels: a complete label cache of the student's predictions (train split).
        experiment: the experiment's name in the run directory (``teacher_round2``, ...).
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        echo: where status lines go.
    """
    fcfg = feedback_config(cfg)
    validate_config(fcfg, roles=("teacher",), distill=True)
    exp = open_experiment(fcfg, experiment, storage)
    done = existing_outcome(exp, fcfg, "teacher", echo)
    if done is not None:
        return done
    dims = exp.reader.dims
    # the student's predictions, checked against this dataset like any teacher's labels
    student = resolve_teachers(
        (TeacherSpec("cache", url(absolute(student_labels))),),
        fingerprint=exp.store.fingerprint,
        window_shape=(dims.horizon, dims.nodes, dims.out_channels),
        windows=exp.reader.windows("train"),
    )
    labels = LabelSpec(student, exp.store.fingerprint)
    write_config(fcfg, exp.path / "config.yaml")
    job = TrainJob(
        config=fcfg,
        role="teacher",
        experiment=experiment,
        dataset=str(exp.dataset),
        make_loss=functools.partial(make_distill_loss, labels, str(exp.path)),
        experiment_dir=str(exp.path),
        init_weights=url(absolute(start)),
    )
    c = cfg.cluster
    with ray_cluster(c) as where:
        echo(
            f"fine-tuning teacher {cfg.teacher.model!r} on the targets and student "
            f"{student[0].version}'s predictions (feedback {cfg.distill.feedback:g}) with "
            f"{c.describe_workers()} worker(s) on {where}"
        )
        fit(job, exp.run, fcfg.teacher.schedule.epochs)
    return trained_outcome(exp, fcfg, "teacher")
