"""``stkd update RUN``: the run's teacher and student follow the data appended to its store.

After ``stkd ingest --append`` has grown the run's store, one update is five stages of the same
stage mechanism as ``distill`` (each recorded in ``stages.json``, skipped when complete, resumed
when interrupted):

1. ``dataset``: the store as it is now (its fingerprint names the update);
2. ``update<k>_teacher``: the newest teacher (the last one published, else the run's) fine-tuned
   from its best checkpoint on the windows of the last ``update.days`` days of the training split
   (``data.recent_days``), ``update.teacher_epochs`` epochs; then published
   (:mod:`~stkd_dist.serving.published`): servers started with ``stkd serve --follow RUN`` load
   it for new streams while streams in progress finish on their version;
3. ``update<k>_labels``: its labels of those windows, once, into ``<run>/labels/<version>.zarr``
   (one computation per (version, window), whatever reads them);
4. ``update<k>_student``: the newest student fine-tuned from its best checkpoint on those labels;
5. ``update<k>_evaluate``: the models before and after the update, and the naive baselines, on the
   test split and on its newest ``update.evaluate_days`` days: ``<run>/updates/update<k>.json``.

``<run>/updates.json`` lists the updates, one per store fingerprint; running ``stkd update``
again on the same store resumes (or repeats nothing of) the same update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stkd_dist.config import Config, write_config
from stkd_dist.data.reader import WindowReader, recent_start, windows_from
from stkd_dist.errors import InputError
from stkd_dist.location import Location, PathInput, exists, read_json, url, write_json_atomic
from stkd_dist.metrics import MetricAccumulator
from stkd_dist.pipeline.graph import LabelStage, ModelStage, NoteStage, StageGraph
from stkd_dist.pipeline.run import RunLayout, StageBook, config_digest
from stkd_dist.pipeline.stages import RaySession, train_result
from stkd_dist.pipeline.ui import PipelineUI, StageReport, run_log
from stkd_dist.serving.published import Published, publish_version, read_published
from stkd_dist.storage import open_store

UPDATES = "updates.json"


@dataclass
class UpdateOutcome:
    """What one ``stkd update`` did.

    Attributes:
        layout: the run directory.
        number: the update's number ``k`` (1 for the first store fingerprint updated to, ...).
        teacher: the updated teacher.
        student: the updated student.
        published: the run's published version after the update.
        evaluation: ``<run>/updates/update<k>.json``'s contents.
        stages: each stage of this invocation.
    """

    layout: RunLayout
    number: int
    teacher: ModelStage
    student: ModelStage
    published: Published
    evaluation: dict[str, Any] = field(default_factory=dict)
    stages: list[StageReport] = field(default_factory=list)


def update_config(cfg: Config) -> Config:
    """``cfg`` as an update's config: training windows of the last ``update.days`` days, the
    update's epochs without warm-up, labels in a cache."""
    u = cfg.update

    def schedule(section: Any, epochs: int) -> Any:
        sched = dataclasses.replace(section.schedule, epochs=epochs, warmup_epochs=0, min_epochs=0)
        return dataclasses.replace(section, schedule=sched)

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, recent_days=u.days),
        # a transferred teacher is now this dataset's: its fine-tune trains on it
        teacher=dataclasses.replace(schedule(cfg.teacher, u.teacher_epochs), dataset=None),
        student=schedule(cfg.student, u.student_epochs),
        serve=dataclasses.replace(cfg.serve, mode="cache"),
    )


def stage_names(k: int) -> list[str]:
    """The stages of update ``k``."""
    return ["dataset", *(f"update{k}_{s}" for s in ("teacher", "labels", "student", "evaluate"))]


def _updates(layout: RunLayout) -> list[dict[str, Any]]:
    path = layout.root / UPDATES
    return list(read_json(path)["updates"]) if exists(path) else []


def update_number(layout: RunLayout, fingerprint: str) -> int:
    """The update that brings the run to ``fingerprint``: its number when one was started,
    else the next one's (recorded at once, so an interrupted update resumes as itself)."""
    updates = _updates(layout)
    for u in updates:
        if u["fingerprint"] == fingerprint:
            return int(u["update"])
    k = len(updates) + 1
    write_json_atomic(
        layout.root / UPDATES, {"updates": [*updates, {"update": k, "fingerprint": fingerprint}]}
    )
    return k


def _record_update(layout: RunLayout, k: int, **facts: Any) -> None:
    updates = _updates(layout)
    for u in updates:
        if int(u["update"]) == k:
            u.update(facts)
    write_json_atomic(layout.root / UPDATES, {"updates": updates})


class _Update:
    """One invocation of update ``k`` of a run."""

    def __init__(
        self, cfg: Config, layout: RunLayout, k: int, storage: PathInput | None, ui: PipelineUI
    ) -> None:
        self.run_cfg = cfg
        self.cfg = update_config(cfg)
        self.layout = layout
        self.k = k
        self.storage = storage
        self.ui = ui
        self.ray = RaySession(self.cfg)
        self.graph = StageGraph(self.cfg, storage, ui, stage_names(k), self.ray)

    def starting_points(self) -> tuple[ModelStage, ModelStage]:
        """The teacher and the student this update starts from: the previous update's, else
        the run's own (its ``teacher`` / ``transfer`` and ``student_kd`` stages)."""
        book = self.graph.book
        teacher_stage = "transfer" if "transfer" in book.records else "teacher"
        teacher = self.graph.recorded(teacher_stage, ModelStage.from_info)
        student = self.graph.recorded("student_kd", ModelStage.from_info)
        if self.k > 1:
            teacher = self.graph.recorded(f"update{self.k - 1}_teacher", ModelStage.from_info)
            student = self.graph.recorded(f"update{self.k - 1}_student", ModelStage.from_info)
        return teacher, student

    def trained(
        self,
        stage: str,
        experiment: str,
        sections: list[str],
        train: Callable[[], Any],
        epochs: int,
        **extra: Any,
    ) -> ModelStage:
        """A fine-tune stage (the experiment starts anew when its inputs changed)."""
        key = config_digest(self.cfg, sections, fingerprint=self.graph.fingerprint, **extra)

        def work() -> tuple[list[Location], ModelStage]:
            self.ui.echo(f"Ray: {self.ray.ensure()}")
            path = self.layout.experiment(experiment)
            self.graph.fresh_experiment(stage, key, path)
            with self.ui.training(path, experiment.replace("_", " "), epochs):
                res = train_result(train())
            return [path / "best.json", res.checkpoint], ModelStage.of(self.layout, res)

        return self.graph.step(stage, key, ModelStage.from_info, work)

    def run(self) -> UpdateOutcome:
        from stkd_dist.labels.teachers import TeacherSpec
        from stkd_dist.train.student import StudentRequest, train_student
        from stkd_dist.train.teacher import train_teacher

        k, cfg, layout = self.k, self.cfg, self.layout
        store = self.graph.dataset()
        old_teacher, old_student = self.starting_points()
        write_config(cfg, layout.root / "updates" / f"update{k}.yaml")
        with self.ray:
            teacher = self.trained(
                f"update{k}_teacher",
                f"teacher_update{k}",
                ["data", "teacher", "update", "run.seed"],
                lambda: train_teacher(
                    cfg,
                    storage=self.storage,
                    echo=self.ui.echo,
                    experiment=f"teacher_update{k}",
                    init_weights=url(old_teacher.path(layout)),
                ),
                cfg.update.teacher_epochs,
                start=old_teacher.version,
            )
            # published at every invocation (idempotent): an update killed after its teacher
            # completed still publishes it
            published = publish_version(
                layout.root, teacher.version, url(teacher.path(layout)), store.fingerprint
            )
            self.ui.echo(f"published teacher {teacher.version} for `stkd serve --follow`")
            labels: LabelStage = self.graph.labels(teacher, ["train"], name=f"update{k}_labels")
            cache = TeacherSpec("cache", url(labels.location(layout)))
            student = self.trained(
                f"update{k}_student",
                f"student_update{k}",
                ["data", "student", "distill", "update", "run.seed"],
                lambda: train_student(
                    cfg,
                    StudentRequest(
                        teachers=(cache,),
                        experiment=f"student_update{k}",
                        init_weights=url(old_student.path(layout)),
                    ),
                    storage=self.storage,
                    echo=self.ui.echo,
                ),
                cfg.update.student_epochs,
                teacher=teacher.version,
                start=old_student.version,
            )
        models = {
            "teacher_before": old_teacher,
            "teacher_after": teacher,
            "student_before": old_student,
            "student_after": student,
        }
        note = self.evaluate(models)
        _record_update(
            layout, k, teacher=teacher.version, student=student.version, evaluated=note.note
        )
        evaluation = read_json(self.evaluation_path)
        return UpdateOutcome(layout, k, teacher, student, published, evaluation, self.graph.reports)

    @property
    def evaluation_path(self) -> Location:
        return self.layout.root / "updates" / f"update{self.k}.json"

    def evaluate(self, models: Mapping[str, ModelStage]) -> NoteStage:
        versions = {name: m.version for name, m in models.items()}
        key = config_digest(
            self.cfg, ["data", "update"], fingerprint=self.graph.fingerprint, **versions
        )

        def work() -> tuple[list[Location], NoteStage]:
            from stkd_dist.checkpoint import load_forecaster
            from stkd_dist.pipeline.findings import baseline_predictors, model_predictor
            from stkd_dist.train.loop import build_reader

            assert self.graph.store is not None
            # every test window, with the run's own data settings (not the update's recent days)
            reader = build_reader(self.run_cfg, self.graph.store)
            predict = {
                name: model_predictor(load_forecaster(m.path(self.layout), role=name)[0])
                for name, m in models.items()
            }
            predict.update(baseline_predictors(reader))
            days = self.cfg.update.evaluate_days or self.cfg.update.days
            test = reader.windows("test")
            newest = newest_windows(reader, test, days)
            batch = self.cfg.data.eval_batch_size
            with self.ui.status("evaluating the models before and after the update ..."):
                result: dict[str, Any] = {
                    "update": self.k,
                    "fingerprint": self.graph.fingerprint,
                    "versions": versions,
                    "test": windows_mae(reader, predict, test, batch),
                    "newest_days": days,
                    "newest": windows_mae(reader, predict, newest, batch),
                    "windows": {"test": len(test), "newest": len(newest)},
                }
            write_json_atomic(self.evaluation_path, result)
            new = result["newest"]
            text = (
                f"newest {days} test day(s): student {new['student_before']:.4f} -> "
                f"{new['student_after']:.4f}, teacher {new['teacher_before']:.4f} -> "
                f"{new['teacher_after']:.4f} (MAE)"
            )
            return [self.evaluation_path], NoteStage(text)

        return self.graph.step(f"update{self.k}_evaluate", key, NoteStage.from_info, work)


def newest_windows(reader: WindowReader, windows: range, days: int) -> range:
    """The windows of ``windows`` that start in its last ``days`` days (by the time axis)."""
    return windows_from(
        windows, recent_start((windows.start, windows.stop), days, reader.store.time)
    )


def windows_mae(
    reader: WindowReader, predict: Mapping[str, Any], windows: range, batch_size: int
) -> dict[str, float]:
    """Masked MAE of each predictor over ``windows`` (time order, one read of each batch)."""
    accs = {name: MetricAccumulator(reader.window.horizon) for name in predict}
    idx = np.arange(windows.start, windows.stop, windows.step, dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(idx), batch_size):
            batch = reader.batch(idx[i : i + batch_size])
            for name, fn in predict.items():
                accs[name].update(fn(batch), batch.y, batch.mask)
    return {name: float(acc.compute().mae) for name, acc in accs.items()}


def run_update(
    cfg: Config, *, storage: PathInput | None = None, ui: PipelineUI | None = None
) -> UpdateOutcome:
    """Update run ``cfg.run.name`` to the data now in its store (see the module docstring).

    Args:
        cfg: the run's config (``<run>/config.yaml``, with any overrides of ``update``).
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        ui: console output (default: stdout).

    Raises:
        InputError: the run has no teacher and student yet, or the store holds nothing newer than
            the teacher the update would start from.
    """
    ui = ui or PipelineUI()
    layout = RunLayout.of(cfg.run_name, storage)
    store = open_store(cfg.data.dataset, storage)
    book = StageBook(layout)
    missing = [n for n in ("teacher", "student_kd") if n not in book.records]
    if missing:  # refused before anything is written
        raise InputError(
            f"run {cfg.run_name!r} has no complete {missing[0]} stage: run `stkd distill` first, "
            "then update it",
            where=url(layout.root),
        )
    published = read_published(layout.root)
    trained_on = published.fingerprint if published is not None else None
    if trained_on is None:
        from stkd_dist.checkpoint import read_checkpoint

        name = "transfer" if "transfer" in book.records else "teacher"
        teacher = ModelStage.from_info(book.records[name].info)
        trained_on = read_checkpoint(teacher.path(layout), verify=False).fingerprint
    known = [u for u in _updates(layout) if u["fingerprint"] == store.fingerprint]
    if trained_on == store.fingerprint and not known:
        raise InputError(
            f"the store holds nothing the teacher has not seen (fingerprint {store.fingerprint}): "
            "append new time steps with `stkd ingest --append` first",
            where=url(store.path),
        )
    k = update_number(layout, store.fingerprint)
    with run_log(layout.logs, "update"):
        ui.echo(f"run {cfg.run_name!r}: update {k} to store fingerprint {store.fingerprint}")
        return _Update(cfg, layout, k, storage, ui).run()
