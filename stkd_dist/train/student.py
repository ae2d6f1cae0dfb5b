"""Student training on Ray Train: the driver side of ``stkd train-student``.

A distilled student trains exactly like a teacher (:mod:`stkd_dist.train.loop`: DDP workers, one
shard each, checkpoints, best-N, resume, fault tolerance, progress lines); only its loss differs.
Each rank's :class:`DistillLoss` streams ITS OWN shard's soft labels (the windows of the epoch's
shard plan for that rank, in the order it reads them) from the teacher(s) and applies the
registered distillation loss of the ``distill`` section to the student's forecast, the targets and
the teachers' labels. ``--no-distill`` trains the same student on the targets alone: the baseline.

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
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stkd_dist.checkpoint import list_checkpoints
from stkd_dist.config import Config, write_config
from stkd_dist.config.validate import distill_loss_kwargs, validate_config
from stkd_dist.distill import FORECAST_LOSSES
from stkd_dist.errors import ConfigError, InputError, StkdError, StoreError
from stkd_dist.labels.autoscale import WaitReporter
from stkd_dist.labels.replicas import replica_cache
from stkd_dist.labels.sources import open_label_source
from stkd_dist.labels.started import ReplicaPlan, started_replicas
from stkd_dist.labels.teachers import (
    LabelSpec,
    TeacherSpec,
    resolve_teachers,
)
from stkd_dist.labels.usage import LabelUse, write_label_use
from stkd_dist.location import Location, exists, location, read_json, url, write_json_atomic
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientOptions, PlanRequest
from stkd_dist.train.experiment import (
    TrainOutcome,
    existing_outcome,
    fit,
    open_experiment,
    trained_outcome,
)
from stkd_dist.train.loop import LossFn, LossValue, TrainJob, WorkerContext
from stkd_dist.train.ray_session import ray_cluster

log = logging.getLogger(__name__)

KD_EXPERIMENT = "student_kd"
SCRATCH_EXPERIMENT = "student_scratch"
TEACHERS_FILE = "teachers.json"


LABELS_DIR = "labels"


def delivery_path(experiment: str | Path | Location, epoch: int, rank: int) -> Location:
    """``<experiment>/labels/epoch_NNNN/rank_R.json``: a rank's label deliveries of an epoch."""
    return location(experiment) / LABELS_DIR / f"epoch_{epoch:04d}" / f"rank_{rank}.json"


class DistillLoss:
    """A rank's distillation loss: the registered ``distill.loss`` against streamed soft labels.

    Implements the loop's epoch hooks: :meth:`begin_epoch` requests this rank's windows of the
    epoch from every teacher, in plan order, before the first batch; each call joins the batch's
    labels by window index; :meth:`end_epoch` writes the rank's delivery record.

    Args:
        ctx: the worker context.
        labels: the teachers (resolved on the driver).
        experiment_dir: where delivery records go.
    """

    def __init__(self, ctx: WorkerContext, labels: LabelSpec, experiment_dir: str) -> None:
        from stkd_dist.distill import build_loss

        cfg = ctx.config
        self.ctx = ctx
        self.experiment_dir = experiment_dir
        self.criterion = build_loss(cfg.distill.loss, **distill_loss_kwargs(cfg.distill))
        self.source = open_label_source(labels)
        dims = ctx.reader.dims
        self.entries = dims.horizon * dims.nodes * dims.out_channels  # loss terms per sample
        self._parts: dict[str, float] = defaultdict(float)
        self._weight = 0.0
        self._windows = 0
        self._start = 0
        # the autoscaler's signal: this rank's label wait against its step time
        self.reporter = WaitReporter(labels.wait_meter, rank=ctx.rank)
        self._last_step: float | None = None

    def begin_epoch(self, epoch: int, loader: Any) -> None:
        """Ask the teachers for this rank's windows of ``epoch``, in the order it reads them.

        A resumed epoch (the loader starts at a later batch) asks for the rest of the sequence
        only: a streamed teacher's stream starts at that cursor.
        """
        plan = loader.plan
        self._start = loader.start_window  # windows the epoch's batches before this one held
        # [n] int64, derived from the rank's blocks (only those the rest of the epoch touches)
        windows = loader.shard.window_array(self._start)
        self._windows = len(windows)
        self._parts, self._weight = defaultdict(float), 0.0
        # streamed teachers get the plan itself (the server derives the same sequence)
        request = PlanRequest(
            world_size=plan.world_size,
            rank=self.ctx.rank,
            epoch=plan.epoch,
            seed=plan.seed,
            batch_size=plan.batch_size,
            shuffle=plan.shuffle,
            chunk_steps=plan.chunk_steps,
            start=self._start,
            regroups=plan.regroups,
        )
        self.source.begin_epoch(windows, request)
        # the first step's wait counts from here: with labels late, it is most of the wait
        self._last_step = time.perf_counter()

    def __call__(self, batch: Any, pred: torch.Tensor) -> LossValue:
        # labels of the batch's windows, in batch order; padding samples get zeros (no loss)
        asked = time.perf_counter()
        teacher, log_var = self.source.labels_for(batch.index, batch.valid)  # [B, H, N, C]
        got = time.perf_counter()
        if self._last_step is not None:  # a step = from one loss call to the next
            self.reporter.step(got - asked, got - self._last_step)
        self._last_step = got
        extra = {} if log_var is None else {"teacher_log_var": log_var.to(pred.device)}
        loss, parts = self.criterion(
            pred, batch.y, batch.mask, teacher.to(pred.device), valid=batch.valid, **extra
        )
        weight = batch.valid.sum() * self.entries  # the teacher term averages over these
        w = float(weight)
        for name, value in parts.items():
            self._parts[name] += value * w
        self._weight += w
        return LossValue(loss, weight)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Write this rank's delivery record; return a few numbers for the epoch's metrics."""
        records = self.source.end_epoch()
        self.reporter.flush()
        self._last_step = None  # validation and checkpointing are not steps
        write_json_atomic(
            delivery_path(self.experiment_dir, epoch, self.ctx.rank),
            {
                "epoch": epoch,
                "rank": self.ctx.rank,
                "world_size": self.ctx.world_size,
                "plan_windows": self._windows,
                "start_window": self._start,
                "teachers": records,
            },
        )
        out: dict[str, Any] = {
            "labels_delivered": sum(int(r["delivered"]) for r in records),
            "label_reconnects": sum(int(r.get("reconnects", 0)) for r in records),
            "label_wait_s": sum(float(r["wait_s"]) for r in records),
        }
        for name, total in self._parts.items():
            if name != "loss":
                out[f"train_{name}"] = total / max(self._weight, 1.0)
        return out

    def partial(self) -> dict[str, Any]:
        """The loss parts summed over the epoch so far (for a mid-epoch checkpoint)."""
        return {"parts": dict(self._parts), "weight": self._weight}

    def restore(self, partial: dict[str, Any]) -> None:
        """Continue the sums of :meth:`partial` (after :meth:`begin_epoch` of a resumed epoch)."""
        # {} on a rank that starts an epoch re-dealt to a new world size (rank 0 got the sums)
        parts = partial.get("parts", {})
        self._parts = defaultdict(float, {k: float(v) for k, v in parts.items()})
        self._weight = float(partial.get("weight", 0.0))

    def close(self) -> None:
        self.source.close()


def make_distill_loss(labels: LabelSpec, experiment_dir: str, ctx: WorkerContext) -> LossFn:
    """Loss factory of a distilled student (bind ``labels`` and ``experiment_dir`` first)."""
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
    storage: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> TrainOutcome:
    """Train (or resume, or report) the student of ``cfg`` on Ray Train.

    Args:
        cfg: the resolved config (``run.name`` set; ``student`` and ``distill`` sections used).
        request: teachers and client options, or ``distill=False`` for the baseline.
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        echo: where status lines go.
    """
    if request.distill and cfg.distill.loss == "hint":
        raise ConfigError(
            "the hint loss needs the teacher's hidden states, which teacher services and label "
            f"caches do not provide yet; use one of {', '.join(FORECAST_LOSSES)}",
            where="distill.loss",
        )
    if request.distill and cfg.distill.loss not in FORECAST_LOSSES:
        raise ConfigError(
            f"loss {cfg.distill.loss!r} distils class logits, but teachers serve forecasts; use "
            f"one of {', '.join(FORECAST_LOSSES)}",
            where="distill.loss",
        )
    validate_config(cfg, roles=("student",), distill=request.distill)
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
        plan=dataclasses.replace(request.replicas, cache=cache),
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
            )
            labels = LabelSpec(
                resolved,
                store.fingerprint,
                ensemble=cfg.distill.ensemble,
                spread=cfg.distill.confidence_weighting,
                client=request.client,
                wait_meter=started.wait_meter,
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


def student_teachers(experiment: str | Path | Location) -> dict[str, Any] | None:
    """``teachers.json`` of a distilled student's experiment (None when absent)."""
    path = location(experiment) / TEACHERS_FILE
    if not exists(path):
        return None
    return read_json(path)
