"""The stages ``stkd distill`` and ``stkd sweep`` share, run by one mechanism.

A :class:`StageGraph` is one command's walk through the run's stages: ``dataset`` → ``teacher``
→ ``labels`` (when the command reads a label cache) → the command's own stages (``distill``'s
students, evaluation and report; ``sweep``'s trials). Every stage goes through
:meth:`StageGraph.step`: skipped when ``stages.json`` (:class:`~.run.StageBook`) records it as
complete with the same key and its outputs still exist, run and recorded otherwise. Both commands
therefore reuse each other's work in the same run: a sweep after ``distill`` trains no teacher
and computes no labels, and the other way round.

What a stage hands to the stages after it is a typed record (:class:`ModelStage`,
:class:`LabelStage`, :class:`NoteStage`), stored as the record's ``info`` and read back through
the same class, never as a dict read by key.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from stkd_dist.config import Config
from stkd_dist.labels.replicas import replica_compute
from stkd_dist.location import (
    Location,
    PathInput,
    absolute,
    exists,
    location,
    makedirs,
    read_json,
    rename_or_copy,
    url,
    write_json_atomic,
)
from stkd_dist.pipeline.run import RunLayout, StageBook, StageRecord, config_digest
from stkd_dist.pipeline.stages import (
    CacheResult,
    RaySession,
    TrainResult,
    ensure_dataset,
    ensure_label_cache,
    label_cache_path,
    train_teacher_stage,
)
from stkd_dist.pipeline.ui import PipelineUI, StageReport
from stkd_dist.storage import DatasetStore, open_store
from stkd_dist.train.transfer import transfer_teacher


def _resolve(layout: RunLayout, recorded: str) -> Location:
    """A recorded path: relative to the run directory, or absolute (a URL or a local path)."""
    if "://" in recorded or os.path.isabs(recorded):
        return location(recorded)
    return layout.root / recorded


def _record_path(layout: RunLayout, path: PathInput) -> str:
    """How ``path`` is recorded: relative to the run directory when inside it, else absolute."""
    try:
        return layout.relative(path)
    except ValueError:  # not under the run directory
        return url(absolute(path))


class StageInfo(Protocol):
    """A stage's typed record: what it stores in ``stages.json`` and shows when skipped."""

    def to_info(self) -> dict[str, Any]: ...

    def detail(self) -> str: ...


#: the experiment folder of the transferred teacher (``teacher.dataset``)
TRANSFER = "teacher_transfer"
#: in a training stage's experiment folder: the stage key its training belongs to
STAGE_KEY_FILE = "stage_key.json"
#: under the run directory: experiments a changed stage replaced (moved here, never deleted)
SUPERSEDED = "superseded"

T = TypeVar("T", bound=StageInfo)


@dataclass(frozen=True)
class ModelStage:
    """A trained model of the run (the ``teacher`` stage, each student stage).

    Attributes:
        checkpoint: its best checkpoint, relative to the run directory (absolute when the model
            is not the run's own, e.g. ``stkd sweep --checkpoint``).
        version: its version (what clients and caches check).
        val_mae: its validation MAE.
        epochs: epochs trained in all.
        trained: False when its run was already complete and nothing was trained.
    """

    checkpoint: str
    version: str
    val_mae: float
    epochs: int = 0
    trained: bool = False

    @classmethod
    def of(cls, layout: RunLayout, res: TrainResult) -> ModelStage:
        """The record of a training stage's result."""
        return cls(
            _record_path(layout, res.checkpoint), res.version, res.val_mae, res.epochs, res.trained
        )

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ModelStage:
        return cls(
            checkpoint=str(info["checkpoint"]),
            version=str(info["version"]),
            val_mae=float(info["val_mae"]),
            epochs=int(info.get("epochs", 0)),
            trained=bool(info.get("trained", False)),
        )

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    def path(self, layout: RunLayout) -> Location:
        """The checkpoint's location."""
        return _resolve(layout, self.checkpoint)

    def detail(self) -> str:
        return f"best {self.version}, val MAE {self.val_mae:.4f}"


@dataclass(frozen=True)
class LabelStage:
    """The ``labels`` stage: a complete label cache of the teacher.

    Attributes:
        path: the cache, relative to the run directory.
        version: the teacher version it holds labels of.
        windows: windows it holds, per split.
        forward_windows: teacher forward passes (windows) it cost, once.
    """

    path: str
    version: str
    windows: dict[str, int]
    forward_windows: int

    @classmethod
    def of(cls, layout: RunLayout, cache: CacheResult) -> LabelStage:
        return cls(
            _record_path(layout, cache.path), cache.version, cache.windows, cache.forward_windows
        )

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> LabelStage:
        return cls(
            path=str(info["path"]),
            version=str(info["version"]),
            windows={str(k): int(v) for k, v in info["windows"].items()},
            forward_windows=int(info["forward_windows"]),
        )

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    def location(self, layout: RunLayout) -> Location:
        """The cache's location."""
        return _resolve(layout, self.path)

    @property
    def distinct_windows(self) -> int:
        """Windows it holds, all splits together."""
        return sum(self.windows.values())

    def detail(self) -> str:
        return (
            f"{self.distinct_windows} windows of teacher {self.version}; "
            f"{self.forward_windows} teacher forward passes"
        )


@dataclass(frozen=True)
class NoteStage:
    """A stage whose outputs are files only (evaluation, statistics, report): its result line."""

    note: str

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> NoteStage:
        return cls(str(info.get("detail", "")))

    def to_info(self) -> dict[str, Any]:
        return {"detail": self.note}

    def detail(self) -> str:
        return self.note


class StageGraph:
    """One command's stages of run ``cfg.run.name``: run, skipped or recorded, in order.

    Args:
        cfg: the resolved config (``run.name`` set).
        storage: the storage root (None: ``$STKD_STORAGE`` or ``./storage``).
        ui: console output.
        names: the command's stages, in order (for the ``[i/n]`` headers).
        ray: the command's Ray session (started by the first stage that needs it).
    """

    def __init__(
        self,
        cfg: Config,
        storage: PathInput | None,
        ui: PipelineUI,
        names: Sequence[str],
        ray: RaySession,
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.ui = ui
        self.names = list(names)
        self.ray = ray
        self.layout = RunLayout.of(cfg.run_name, storage)
        self.book = StageBook(self.layout)
        self.reports: list[StageReport] = []
        self.store: DatasetStore | None = None

    @property
    def fingerprint(self) -> str:
        assert self.store is not None, "the dataset stage runs first"
        return self.store.fingerprint

    def header(self, name: str, note: str = "") -> None:
        """The ``[i/n] name`` header of a stage."""
        self.ui.stage(self.names.index(name) + 1, len(self.names), name, note)

    def report(self, name: str, status: str, seconds: float, detail: str) -> None:
        """Note how stage ``name`` went in this invocation (and show its result line)."""
        self.ui.echo(f"{name}: {detail}" if status == "skipped" else detail)
        self.reports.append(StageReport(name, status, seconds, detail))

    def step(
        self,
        name: str,
        key: str,
        kind: Callable[[Mapping[str, Any]], T],
        work: Callable[[], tuple[list[Location], T]],
    ) -> T:
        """Run stage ``name`` unless it completed with the same ``key`` and its outputs exist.

        ``work`` returns ``(outputs, record)``; the stage is recorded in ``stages.json`` once it
        returns. ``kind`` reads the record of a completed stage back (``ModelStage.from_info``).
        """
        done = self.book.completed(name, key)
        if done is not None:
            self.header(name, "skipped: already complete")
            record = kind(done.info)
            self.report(name, "skipped", done.seconds, record.detail())
            return record
        self.header(name, self.book.why_redo(name, key))
        t0 = time.perf_counter()
        outputs, record = work()
        seconds = time.perf_counter() - t0
        self.book.record(name, key, outputs, seconds, record.to_info())
        self.reports.append(StageReport(name, "ran", seconds, record.detail()))
        return record

    def fresh_experiment(self, name: str, key: str, experiment: Location) -> None:
        """Make ``experiment`` the training folder of stage ``name`` with ``key``.

        A trainer resumes whatever its experiment folder holds (and does nothing when that
        training is complete). That is right when the same stage was interrupted, and wrong when
        the stage runs because its inputs changed: the folder then holds the training of other
        inputs. Such a folder (its recorded key differs, or it predates key files and the stage's
        completed record has another key) is moved to ``<run>/superseded/`` first; the folder
        then records ``key``, so an interrupted retraining resumes.
        """
        marker = experiment / STAGE_KEY_FILE
        if exists(marker):
            stale = read_json(marker).get("key") != key
        else:
            record = self.book.records.get(name)
            stale = record is not None and record.key != key and exists(experiment)
        if stale:
            dest = self.layout.root / SUPERSEDED / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            makedirs(dest.parent)
            rename_or_copy(experiment, dest)
            self.ui.echo(f"{name}: its inputs changed; the earlier training moved to {url(dest)}")
        makedirs(experiment)
        write_json_atomic(marker, {"stage": name, "key": key})

    def recorded(self, name: str, kind: Callable[[Mapping[str, Any]], T]) -> T:
        """The typed record of stage ``name``, completed earlier in this invocation or before."""
        record: StageRecord = self.book.records[name]
        return kind(record.info)

    def finished(self, name: str) -> float:
        """When stage ``name`` last completed (Unix time; part of later stages' keys)."""
        return self.book.records[name].finished

    # -- the shared stages ---------------------------------------------------------------------
    def dataset(self) -> DatasetStore:
        """Open the config's store (the embedded ``demo`` default is synthesised if absent)."""
        self.header("dataset")
        t0 = time.perf_counter()
        with self.ui.progress(f"synthesising {self.cfg.data.dataset!r}") as bar:
            self.store, created = ensure_dataset(self.cfg, self.storage, on_block=bar.on_block)
        s = self.store
        detail = (
            f"{'synthesised' if created else 'opened'} {s.name!r}: {s.steps} steps x {s.nodes} "
            f"nodes x {len(s.channels)} channel(s), fingerprint {s.fingerprint}"
        )
        self.report("dataset", "ran" if created else "reused", time.perf_counter() - t0, detail)
        return s

    def teacher(self) -> ModelStage:
        """DDP teacher training on Ray Train (or its record, when complete); on
        ``teacher.dataset`` when set (then :meth:`transferred` makes it this run's)."""
        cfg, fingerprint = self.cfg, self.fingerprint
        if self.cfg.teacher.dataset is not None:
            source = open_store(self.cfg.teacher.dataset, self.storage)
            # the teacher's own run config: trained on the source like any teacher
            cfg = dataclasses.replace(
                cfg,
                # every target of the source (data.target_fraction is about data.dataset)
                data=dataclasses.replace(
                    cfg.data, dataset=self.cfg.teacher.dataset, target_fraction=1.0
                ),
                teacher=dataclasses.replace(cfg.teacher, dataset=None),
            )
            fingerprint = source.fingerprint
        key = config_digest(cfg, ["data", "teacher", "run.seed"], fingerprint=fingerprint)

        def work() -> tuple[list[Location], ModelStage]:
            self.ui.echo(f"Ray: {self.ray.ensure()}")
            experiment = self.layout.experiment("teacher")
            self.fresh_experiment("teacher", key, experiment)
            epochs = cfg.teacher.schedule.epochs
            with self.ui.training(experiment, "teacher", epochs):
                res = train_teacher_stage(cfg, self.storage, echo=self.ui.echo)
            return [experiment / "best.json", res.checkpoint], ModelStage.of(self.layout, res)

        return self.step("teacher", key, ModelStage.from_info, work)

    def transferred(self, teacher: ModelStage) -> ModelStage:
        """``teacher`` (trained on ``teacher.dataset``) as a teacher of this run's dataset:
        its weights with this dataset's graph, statistics and fingerprint (``train.transfer``)."""
        key = config_digest(self.cfg, ["data"], teacher=teacher.version, target=self.fingerprint)

        def work() -> tuple[list[Location], ModelStage]:
            assert self.store is not None, "the dataset stage runs first"
            dest = self.layout.experiment(TRANSFER) / "checkpoint"
            info = transfer_teacher(teacher.path(self.layout), self.store, dest, self.storage)
            self.ui.echo(
                f"transferred teacher {teacher.version} ({self.cfg.teacher.dataset}) to "
                f"{self.store.name!r}: {self.store.nodes} nodes, its statistics and graph"
            )
            # the validation MAE is the source's: none was measured on this dataset
            stage = ModelStage(
                _record_path(self.layout, dest), info.version, teacher.val_mae, teacher.epochs
            )
            return [dest], stage

        return self.step("transfer", key, ModelStage.from_info, work)

    def given_teacher(self, checkpoint: str) -> ModelStage:
        """A teacher given by reference (checkpoint, run directory or run name), not trained."""
        from stkd_dist.checkpoint import read_checkpoint, resolve_checkpoint

        self.header("teacher", "given")
        path = absolute(resolve_checkpoint(checkpoint, "teacher", self.storage))
        info = read_checkpoint(path)
        val = float(info.val_mae) if info.val_mae is not None else float("nan")
        record = ModelStage(url(path), str(info.version), val, int(info.epoch) + 1)
        self.report("teacher", "given", 0.0, f"{record.detail()} ({path})")
        return record

    def labels(
        self,
        teacher: ModelStage,
        splits: Sequence[str],
        hidden: bool = False,
        name: str = "labels",
    ) -> LabelStage:
        """The teacher's labels of every window of ``splits``, once, into the run's label cache.

        ``hidden``: the cache also holds the teacher's hidden states (a ``hint`` student reads
        them); part of the key only then, so runs with other losses share their caches.
        ``name``: the stage (``distill.rounds`` label later teachers, and students, the same way).
        """
        extra = {"hidden": True} if hidden else {}
        key = config_digest(self.cfg, [], teacher=teacher.version, splits=list(splits), **extra)

        def work() -> tuple[list[Location], LabelStage]:
            assert self.store is not None, "the dataset stage runs first"
            with self.ui.progress("teacher soft labels (windows)") as bar:
                cache = ensure_label_cache(
                    teacher.path(self.layout),
                    self.store.path,
                    label_cache_path(self.layout, teacher.version),
                    splits,
                    batch_size=self.cfg.serve.batch_size,
                    compute=replica_compute(self.cfg.serve),
                    progress=bar.advance,
                    on_start=bar.start,
                    hidden=hidden,
                )
            if not cache.computed:
                self.ui.echo("an existing complete label cache was reused")
            return [cache.path], LabelStage.of(self.layout, cache)

        return self.step(name, key, LabelStage.from_info, work)
