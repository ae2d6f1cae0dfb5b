"""Student training on Ray Train: the driver side of ``stkd train-student``.

A distilled student trains exactly like a teacher (:mod:`stkd_dist.train.loop`: DDP workers, one
shard each, checkpoints, best-N, resume, fault tolerance, progress lines); only its loss differs.
Each rank's :class:`~stkd_dist.train.distill_loss.DistillLoss` streams ITS OWN shard's soft labels
(the windows of the epoch's shard plan for that rank, in the order it reads them) from the
teacher(s) and applies the registered distillation loss of the ``distill`` section to the student's
forecast, the targets and the teachers' labels. ``distill.loss: hint`` also distils the teacher's
hidden states through a projection trained with the student (:mod:`stkd_dist.train.hint`): the
teacher must deliver them (a teacher service, or a label cache made with them). ``--no-distill``
trains the same student on the targets alone: the baseline.

Runs live in ``<storage>/runs/<run>/``: the distilled student's Ray experiment is
``student_kd/`` (the baseline's ``student_scratch/``) with ``epoch_NNNN`` checkpoints,
``history.jsonl``, ``best.json``, ``config.yaml``, ``teachers.json`` (the teachers' versions,
locations and ensemble weights) and ``labels/epoch_NNNN/rank_R.json``: per epoch and rank, how many
labels each teacher was asked for and delivered, in how many chunks, from which replicas, after how
many reconnections, and how long the rank waited for them.

Determinism: with the same seed the student's parameters are bitwise identical whatever the
teachers' replicas do (restart, die mid-stream, answer slowly): batches follow the shard plan and
labels are joined to them by window index, labels are deterministic per window (teachers run in
fixed-size micro-batches, see :data:`stkd_dist.serving.teacher.MICRO_BATCH`), and ``float32``
labels are sent bit-exact. A label cache of the same teacher gives the same parameters as streaming.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stkd_dist.checkpoint import list_checkpoints
from stkd_dist.config import Config, write_config
from stkd_dist.config.validate import validate_config
from stkd_dist.distill import FORECAST_LOSSES, HIDDEN_LOSSES
from stkd_dist.errors import ConfigError, InputError, StkdError, StoreError
from stkd_dist.labels.replicas import replica_cache
from stkd_dist.labels.started import ReplicaPlan, started_replicas
from stkd_dist.labels.teachers import (
    LabelSpec,
    TeacherSpec,
    check_cache_hidden,
    resolve_teachers,
)
from stkd_dist.labels.usage import LabelUse, write_label_use
from stkd_dist.location import (
    Location,
    PathInput,
    exists,
    location,
    read_json,
    url,
    write_json_atomic,
)
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientOptions
from stkd_dist.train.distill_loss import LABELS_DIR, DistillLoss, delivery_path
from stkd_dist.train.experiment import (
    TrainOutcome,
    existing_outcome,
    fit,
    open_experiment,
    trained_outcome,
)
from stkd_dist.train.hint import HintDistillLoss
from stkd_dist.train.loop import LossFn, LossValue, TrainJob, WorkerContext
from stkd_dist.train.ray_session import ray_cluster

# the loss and the delivery records live in distill_loss; importable from here as before
__all__ = [
    "KD_EXPERIMENT",
    "LABELS_DIR",
    "SCRATCH_EXPERIMENT",
    "TEACHERS_FILE",
    "DistillLoss",
    "StudentRequest",
    "delivery_path",
    "make_distill_loss",
    "make_task_loss",
    "student_teachers",
    "train_student",
]

log = logging.getLogger(__name__)

KD_EXPERIMENT = "student_kd"
SCRATCH_EXPERIMENT = "student_scratch"
TEACHERS_FILE = "teachers.json"


def make_distill_loss(labels: LabelSpec, experiment_dir: str, ctx: WorkerContext) -> LossFn:
    """Loss factory of a distilled student (bind ``labels`` and ``experiment_dir`` first): the
    hint loss with its projection when ``labels`` bring hidden states, else :class:`DistillLoss`."""
    if labels.hidden:
        return HintDistillLoss(ctx, labels, experiment_dir)
    return DistillLoss(ctx, labels, experiment_dir)


def make_task_loss(ctx: WorkerContext) -> LossFn:
    """The baseline student's loss: the ``distill.task`` criterion on the targets alone."""
    from stkd_dist.distill.criteria import build_criterion

    criterion = build_criterion(ctx.config.distill.task)

    def loss(batch: Any, pred: torch.Tensor) -> LossValue:
        # padding samples have an all-False mask: weight 0, they add nothing
        return LossValue(criterion(pred, batch.y, batch.mask), batch.mask.sum())

    return loss


@dataclass(frozen=True)
class StudentRequest:
    """What ``stkd train-student`` asks for besides the config.

    Attributes:
        teachers: the teachers, unresolved (``stream``, ``cache`` or ``replicas``); empty with
            ``distill=False``.
        distill: False trains the baseline on the targets only.
        checkpoint: teacher checkpoint that ``replicas`` teachers serve (None: the run's own
            teacher, ``<storage>/runs/<run>/teacher``).
        client: options of the teacher-service clients.
        replicas: how ``replicas`` teachers are started (server, compute, CPUs, security,
            placement, autoscaling; see :func:`~stkd_dist.labels.started.replica_plan`).
        write_through: ``replicas`` teachers share the run's label cache
            (``<run>/labels/<teacher version>.zarr``) and store what they compute in it: the
            teacher computes each window once, however many epochs read it.
        init_weights: a student checkpoint whose weights a new run starts from (``stkd update``
            fine-tunes the run's student on a new teacher version's labels).
        experiment: the experiment's name in the run directory; None = ``student_kd`` (or
            ``student_scratch`` with ``distill=False``). ``stkd distill --seeds`` trains its
            further seeds as ``student_kd_seed<N>`` / ``student_scratch_seed<N>``.
    """

    teachers: tuple[TeacherSpec, ...] = ()
    distill: bool = True
    checkpoint: str | None = None
    client: ClientOptions = field(default_factory=ClientOptions)
    replicas: ReplicaPlan = field(default_factory=ReplicaPlan)
    experiment: str | None = None
    write_through: bool = True
    init_weights: str | None = None

    def __post_init__(self) -> None:
        if self.distill and not self.teachers:
            raise ConfigError(
                "name a teacher (--teacher HOST:PORT, --teacher ray:N or --labels cache:PATH), "
                "or train the baseline with --no-distill",
                where="--teacher",
            )
        if not self.distill and self.teachers:
            raise ConfigError(
                "--no-distill trains without teachers; drop --teacher/--labels", "--no-distill"
            )
        if self.checkpoint is not None and not any(t.kind == "replicas" for t in self.teachers):
            raise ConfigError(
                "names the checkpoint that --teacher ray:N replicas serve; no replicas are started",
                where="--checkpoint",
            )


def _user_error(exc: BaseException) -> StkdError | None:
    """The first user-facing error a failed Ray Train run carries (a worker's StkdError).

    Ray hands a worker's exception over wrapped (its message then holds the remote traceback);
    the CLI wants the one-line message, so a plain error of the same kind is rebuilt from it.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    for _, err in sorted(failures.items()):
        seen: set[int] = set()
        e: BaseException | None = err
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, StkdError):
                kind = next(
                    (k for k in type(e).__mro__ if k in (ConfigError, StoreError, InputError)),
                    StkdError,
                )
                return kind(e.message, where=e.where)
            e = getattr(e, "cause", None) or e.__cause__
    return None


def _check_teachers_unchanged(experiment: Location, teachers: Sequence[TeacherSpec]) -> None:
    """Refuse to resume a distilled run with other teachers than it started with."""
    path = experiment / TEACHERS_FILE
    if not exists(path) or not list_checkpoints(experiment):
        return
    before = [t["version"] for t in read_json(path)["teachers"]]
    now = [t.version for t in teachers]
    if before != now:
        raise ConfigError(
            f"the run was distilled from teacher(s) {before}, now {now}; use another --run-name "
            "to distill from other teachers",
            where="--teacher",
        )


def train_student(
    cfg: Config,
    request: StudentRequest,
    *,
    storage: PathInput | None = None,
    echo: Callable[[str], None] = print,
) -> TrainOutcome:
    """Train (or resume, or report) the student of ``cfg`` on Ray Train.

    Args:
        cfg: the resolved config (``run.name`` set; ``student`` and ``distill`` sections used).
        request: teachers and client options, or ``distill=False`` for the baseline.
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        echo: where status lines go.
    """
    usable = (*FORECAST_LOSSES, *HIDDEN_LOSSES)
    if request.distill and cfg.distill.loss not in usable:
        raise ConfigError(
            f"loss {cfg.distill.loss!r} distils class logits, but teachers serve forecasts (and "
            f"hidden states); use one of {', '.join(usable)}",
            where="distill.loss",
        )
    # the hint loss also distils the teacher's hidden states: asked for, checked and pinned
    hidden = request.distill and cfg.distill.loss in HIDDEN_LOSSES
    validate_config(cfg, roles=("student",), distill=request.distill)
    if hidden:
        # a label cache without the hidden states is refused before any cluster starts
        check_cache_hidden(request.teachers)
    name = request.experiment or (KD_EXPERIMENT if request.distill else SCRATCH_EXPERIMENT)
    exp = open_experiment(cfg, name, storage)
    done = existing_outcome(exp, cfg, "student", echo)
    if done is not None:
        return done
    dataset, store, reader, experiment = exp.dataset, exp.store, exp.reader, exp.path

    make_loss: Callable[[WorkerContext], LossFn] = make_task_loss
    c = cfg.cluster
    dims = reader.dims
    teacher_ckpt = request.checkpoint or cfg.run_name  # default: the run's own teacher
    cache = None
    if request.write_through and any(t.kind == "replicas" for t in request.teachers):
        cache = url(replica_cache(cfg.run_name, teacher_ckpt, storage))
    replicas = started_replicas(
        request.teachers,
        checkpoint=teacher_ckpt,
        dataset=dataset,
        run_name=cfg.run_name,
        client=request.client,
        # a write-through cache the replicas create keeps the hidden states a hint student reads
        plan=dataclasses.replace(request.replicas, cache=cache, cache_hidden=hidden),
        storage=storage,
    )
    with ray_cluster(c) as where, replicas as started:
        teachers = started.teachers
        if request.distill:
            resolved = resolve_teachers(
                teachers,
                fingerprint=store.fingerprint,
                window_shape=(dims.horizon, dims.nodes, dims.out_channels),
                windows=reader.windows("train"),
                spread=cfg.distill.confidence_weighting,
                client=request.client,
                hidden=hidden,
            )
            labels = LabelSpec(
                resolved,
                store.fingerprint,
                ensemble=cfg.distill.ensemble,
                spread=cfg.distill.confidence_weighting,
                client=request.client,
                wait_meter=started.wait_meter,
                hidden=hidden,
            )
            weights = labels.weights()  # checks inverse_error has every teacher's MAE
            _check_teachers_unchanged(experiment, resolved)
            write_json_atomic(
                experiment / TEACHERS_FILE,
                {
                    "ensemble": labels.ensemble,
                    "teachers": [
                        {
                            "kind": t.kind,
                            "location": t.location,
                            "version": t.version,
                            "val_mae": t.val_mae,
                            "weight": w,
                        }
                        for t, w in zip(resolved, weights, strict=True)
                    ],
                },
            )
            for t, w in zip(resolved, weights, strict=True):
                mae = "?" if t.val_mae is None else f"{t.val_mae:.4f}"
                echo(f"teacher {t.version} from {t.name} (val_mae {mae}, weight {w:.3f})")
            make_loss = functools.partial(make_distill_loss, labels, str(experiment))
        write_config(cfg, experiment / "config.yaml")
        job = TrainJob(
            config=cfg,
            role="student",
            experiment=experiment.name,
            dataset=str(dataset),
            make_loss=make_loss,
            experiment_dir=str(experiment),
            init_weights=request.init_weights,
        )
        kind = "distilled" if request.distill else "baseline (no teacher)"
        echo(
            f"training {kind} student {cfg.student.model!r} on {store.name} with "
            f"{c.describe_workers()} worker(s) ({'GPU, nccl' if c.use_gpu else 'CPU, gloo'}) on {where}"
        )
        try:
            fit(job, exp.run, cfg.student.schedule.epochs)
        except Exception as e:
            user = _user_error(e)
            if user is None:
                raise
            raise user from e
    counters = started.counters  # read as the block ended, before the replicas stopped
    if counters:
        computed = sum(c.forward_windows for c in counters)
        if cache is not None:
            computed = LabelCache(cache).forward_windows
        timeline = tuple(d.to_json() for d in started.timeline)
        use = LabelUse(computed, len(reader.windows("train")), cache, tuple(counters), timeline)
        write_label_use(experiment, use)
        echo(
            f"soft labels: the teacher computed {use.teacher_windows_computed} windows for "
            f"{use.distinct_windows} distinct training windows"
        )

    return trained_outcome(exp, cfg, "student")


def student_teachers(experiment: PathInput) -> dict[str, Any] | None:
    """``teachers.json`` of a distilled student's experiment (None when absent)."""
    path = location(experiment) / TEACHERS_FILE
    if not exists(path):
        return None
    return read_json(path)
