"""``stkd distill``: the whole distillation run, stage by stage, resumable by run name.

Stages, in order (each recorded in ``stages.json`` when it completes, see :mod:`.run`):

1. ``dataset``: open the config's store (the embedded ``demo`` default is synthesised if absent);
2. ``teacher``: DDP teacher training on Ray Train;
3. ``labels`` (``serve.mode: cache`` only): the teacher's labels of every training window, computed
   once into ``<run>/labels/<teacher version>.zarr``;
4. ``student_kd``: the distilled student; its workers read the label cache, or stream their
   shards' labels from ``serve.replicas`` teacher servers started as Ray actors (or from the
   running servers of ``serve.endpoints``);
5. ``student_scratch``: the same student on the targets alone (the baseline);
   (with ``run.seeds`` = N > 1, both students again for each further seed:
   ``student_kd_seed<S>``, ``student_scratch_seed<S>``, every pair on the same shard plans and
   initialisation);
6. ``evaluate``: every model and both naive baselines on the test split, side by side
   (``metrics.json``, ``history.json``, ``forecasts.npz``, ``locations.npz``);
7. ``statistics``: the teacher against the naive baselines on validation (``teacher_check``) and,
   with several seeds, distilled vs scratch students (``kd_vs_scratch``), see :mod:`.findings`;
8. ``report``: ``report.md`` and ``report.html``.

A stage's key digests what it depends on: the config sections it reads, the dataset fingerprint
and the versions of the models it uses. A re-run skips every stage whose key is unchanged and whose
outputs exist; a retrained teacher (new version) therefore redoes the stages that use it, and only
those. Training stages resume from their latest checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from stkd_dist.config import Config, write_config
from stkd_dist.config.validate import weekday_check
from stkd_dist.labels.usage import label_use
from stkd_dist.location import (
    Location,
    PathInput,
    makedirs,
    url,
)
from stkd_dist.pipeline.findings import (
    baseline_predictors,
    extra_seeds,
    headroom_check,
    label_cost,
    model_predictor,
    seed_experiment,
    split_mae,
    teacher_check,
    with_seed,
    write_findings,
)
from stkd_dist.pipeline.graph import LabelStage, ModelStage, NoteStage, StageGraph
from stkd_dist.pipeline.outputs import MODELS, read_json, write_evaluation
from stkd_dist.pipeline.rounds import (
    Round,
    measure_rounds,
    round_models,
    round_stage_names,
    rounds_finding,
    run_rounds,
)
from stkd_dist.pipeline.run import RunLayout, config_digest
from stkd_dist.pipeline.stages import RaySession, train_student_stage
from stkd_dist.pipeline.ui import PipelineUI, StageReport, run_log
from stkd_dist.storage import DatasetStore

log = logging.getLogger(__name__)

# the splits whose labels the distilled student reads (validation uses the targets only)
LABEL_SPLITS = ("train",)


@dataclass
class DistillOutcome:
    """What a ``stkd distill`` invocation did.

    Attributes:
        layout: the run directory.
        stages: each stage of this invocation, in order.
        metrics: the contents of ``metrics.json``.
        report: ``report.html`` (``report.md`` lies next to it).
        seconds: wall time of the invocation.
    """

    layout: RunLayout
    stages: list[StageReport] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: Location | None = None
    seconds: float = 0.0

    @property
    def ran(self) -> list[str]:
        """Stages that did work in this invocation."""
        return [s.name for s in self.stages if s.status == "ran"]


class _Pipeline:
    """One invocation: the shared stages (:class:`~.graph.StageGraph`) and distill's own."""

    def __init__(
        self,
        cfg: Config,
        storage: PathInput | None,
        ui: PipelineUI,
        worker_logs: bool,
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.ui = ui
        # the epoch lines come from the experiments' history files (PipelineUI.training), so the
        # workers' own chatter is forwarded only when asked for
        self.ray = RaySession(cfg, worker_logs=worker_logs)
        self.graph = StageGraph(cfg, storage, ui, self.stage_names(), self.ray)
        self.layout = self.graph.layout
        self.outcome = DistillOutcome(self.layout, stages=self.graph.reports)
        self.teacher = ModelStage("", "", math.nan)
        self.cache: LabelStage | None = None
        self.rounds: list[Round] = []

    def stage_names(self) -> list[str]:
        names = ["dataset", "teacher"]
        if self.cfg.teacher.dataset is not None:
            names.append("transfer")
        if self.cfg.serve.mode == "cache":
            names.append("labels")
        names += ["student_kd", "student_scratch"]
        for seed in extra_seeds(self.cfg):
            names += [seed_experiment(True, seed), seed_experiment(False, seed)]
        names += round_stage_names(self.cfg)
        return [*names, "evaluate", "statistics", "report"]

    @property
    def store(self) -> DatasetStore:
        assert self.graph.store is not None, "the dataset stage runs first"
        return self.graph.store

    def model(self, name: str) -> ModelStage:
        """The record of a completed model stage (``teacher``, ``student_kd``, ...); the
        teacher of a run with ``teacher.dataset`` is the transferred one."""
        if name == "teacher" and self.cfg.teacher.dataset is not None:
            name = "transfer"
        return self.graph.recorded(name, ModelStage.from_info)

    # -- distill's own stages ------------------------------------------------------------------
    def student(
        self,
        distill: bool,
        seed: int | None = None,
        teacher: ModelStage | None = None,
        cache: LabelStage | None = None,
        name: str | None = None,
    ) -> ModelStage:
        """The distilled (or scratch) student; ``seed``: a further seed of ``run.seeds``;
        ``teacher``, ``cache`` and ``name``: a later round's teacher, its labels and student
        (default: the run's teacher and label cache)."""
        cfg = self.cfg if seed is None else with_seed(self.cfg, seed)
        teacher = teacher or self.teacher
        cache = cache if teacher is not self.teacher else self.cache
        if name is None:
            name = "student_kd" if distill else "student_scratch"
            if seed is not None:
                name = seed_experiment(distill, seed)
        if distill:
            sections = ["data", "student", "distill", "run.seed", "serve.mode", "serve.wire_dtype"]
            extra: dict[str, Any] = {"teacher": teacher.version}
            if self.cfg.serve.mode == "stream":
                extra["endpoints"] = self.cfg.serve.endpoints
        else:
            sections, extra = ["data", "student", "distill.task", "run.seed"], {}
        key = config_digest(cfg, sections, fingerprint=self.graph.fingerprint, **extra)

        def work() -> tuple[list[Location], ModelStage]:
            self.ui.echo(f"Ray: {self.ray.ensure()}")
            self.graph.fresh_experiment(name, key, self.layout.experiment(name))
            labels = teacher_ckpt = None
            if distill:
                teacher_ckpt = teacher.path(self.layout)
                if cache is not None:
                    labels = cache.location(self.layout)
                    self.ui.echo(f"soft labels from the label cache {labels}")
                elif self.cfg.serve.endpoints:
                    self.ui.echo(f"soft labels streamed from {self.cfg.serve.endpoints}")
                else:
                    self.ui.echo(
                        f"soft labels streamed from {self.cfg.serve.replicas} teacher "
                        "replica(s) (Ray actors)"
                    )
            what = "distilled student" if distill else "baseline student"
            epochs = self.cfg.student.schedule.epochs
            with self.ui.training(self.layout.experiment(name), what, epochs):
                res = train_student_stage(
                    cfg,
                    distill=distill,
                    teacher=teacher_ckpt,
                    labels=labels,
                    storage=self.storage,
                    echo=self.ui.echo,
                    experiment=None if name in ("student_kd", "student_scratch") else name,
                )
            if distill and name == "student_kd":
                self._check_teacher_used()
            outputs = [self.layout.experiment(name) / "best.json", res.checkpoint]
            return outputs, ModelStage.of(self.layout, res)

        return self.graph.step(name, key, ModelStage.from_info, work)

    def _check_teacher_used(self) -> None:
        """Warn when the distilled student's teacher is not the run's own (given endpoints)."""
        from stkd_dist.train.student import student_teachers

        used = student_teachers(self.layout.experiment("student_kd")) or {}
        versions = [t.get("version") for t in used.get("teachers", [])]
        mine = self.teacher.version
        if versions and versions != [mine]:
            self.ui.echo(
                f"warning: the student was distilled from teacher(s) {versions}, the report's "
                f"teacher is the run's own {mine}"
            )

    def evaluate(self) -> NoteStage:
        versions = {m: self.model(m).version for m in MODELS}
        # the sensor locations are not part of the data's fingerprint, but the evaluation writes
        # them for the error map: a store re-ingested with (other) --locations is evaluated again
        locations = self.store.locations()
        where = None if locations is None else hashlib.sha256(locations.tobytes()).hexdigest()
        key = config_digest(
            self.cfg,
            ["data", "evaluate"],
            fingerprint=self.graph.fingerprint,
            locations=where,
            **versions,
        )
        return self.graph.step("evaluate", key, NoteStage.from_info, self._evaluate)

    def _evaluate(self) -> tuple[list[Location], NoteStage]:
        from stkd_dist.checkpoint import load_forecaster
        from stkd_dist.pipeline.evaluate_all import evaluate_all
        from stkd_dist.train.loop import build_reader

        store = self.store
        models = {m: load_forecaster(self.model(m).path(self.layout), role=m)[0] for m in MODELS}
        reader = build_reader(self.cfg, store)
        with self.ui.progress("evaluating on the test split (windows)") as bar:
            ev = evaluate_all(
                reader, models, self.cfg.evaluate, self.cfg.data.eval_batch_size, bar.update
            )
        outputs = write_evaluation(self.layout, ev, store, MODELS)
        kd, tm = ev.metrics["student_kd"].mae, ev.metrics["teacher"].mae
        return outputs, NoteStage(f"test MAE: teacher {tm:.4f}, distilled student {kd:.4f}")

    def statistics(self) -> NoteStage:
        seeds = extra_seeds(self.cfg)
        versions = {
            n: self.model(n).version
            for s in seeds
            for n in (seed_experiment(True, s), seed_experiment(False, s))
        }
        versions.update({f"round_{v}": v for v in round_models(self.rounds)})
        key = config_digest(
            self.cfg,
            ["data"],
            evaluated=self.graph.finished("evaluate"),
            teacher_val_mae=self.teacher.val_mae,
            **versions,
        )
        return self.graph.step("statistics", key, NoteStage.from_info, self._statistics)

    def _statistics(self) -> tuple[list[Location], NoteStage]:
        from stkd_dist.checkpoint import load_forecaster
        from stkd_dist.stats import kd_vs_scratch
        from stkd_dist.train.loop import build_reader

        reader = build_reader(self.cfg, self.store)
        batch = self.cfg.data.eval_batch_size
        metrics = read_json(self.layout.metrics) or {}
        with self.ui.status("validation MAE of the naive baselines ..."):
            base = split_mae(reader, baseline_predictors(reader), "val", batch)
        check = teacher_check(self.teacher.val_mae, base)
        self.ui.echo(check["message"])
        headroom = headroom_check(self.teacher.val_mae, self.model("student_scratch").val_mae)
        self.ui.echo(headroom["message"])
        findings: dict[str, Any] = {"teacher_check": check, "headroom": headroom}
        weekdays = weekday_check(self.cfg, self.store.time)
        if weekdays is not None:
            findings["weekday_check"] = weekdays
        detail = "teacher beats both baselines" if check["beats_baselines"] else check["message"]
        seeds = extra_seeds(self.cfg)
        if seeds:
            kd = [metrics["student_kd"]["mae"]]
            scratch = [metrics["student_scratch"]["mae"]]
            with self.ui.progress("test MAE of the further seeds' students") as bar:
                bar.start(2 * len(seeds))
                for s in seeds:
                    for distill, out in ((True, kd), (False, scratch)):
                        name = seed_experiment(distill, s)
                        model = load_forecaster(self.model(name).path(self.layout), role=name)[0]
                        mae = split_mae(reader, {name: model_predictor(model)}, "test", batch)
                        out.append(mae[name])
                        bar.advance()
            entry = kd_vs_scratch(
                kd, scratch, metrics["teacher"]["mae"], [self.cfg.run.seed, *seeds]
            )
            findings["kd_vs_scratch"] = entry
            self.ui.echo(entry["verdict"])
            detail = entry["verdict"]
        if self.rounds:
            with self.ui.status("test MAE of every round's teacher and student ..."):
                test_mae = measure_rounds(self.graph, reader, self.rounds, batch)
            entry = rounds_finding(self.rounds, test_mae, metrics["student_scratch"]["mae"])
            findings["rounds"] = entry
            self.ui.echo(entry["verdict"])
            detail = entry["verdict"]
        uses = [u for u in map(label_use, self._distilled_experiments()) if u is not None]
        cost = label_cost(self.cfg.serve.mode, uses, self.cache)
        if cost is not None:
            findings["labels"] = cost
        write_findings(self.layout.metrics, findings)
        return [self.layout.metrics], NoteStage(detail)

    def _distilled_experiments(self) -> list[Location]:
        """The experiments of the run's distilled students (every seed)."""
        names = ["student_kd", *(seed_experiment(True, s) for s in extra_seeds(self.cfg))]
        return [self.layout.experiment(n) for n in names]

    def report(self) -> NoteStage:
        key = config_digest(self.cfg, [], evaluated=self.graph.finished("statistics"))

        def work() -> tuple[list[Location], NoteStage]:
            from stkd_dist.report import write_report

            with self.ui.status("rendering the report ..."):
                md, html = write_report(self.layout.root)
            return [md, html], NoteStage(str(html))

        return self.graph.step("report", key, NoteStage.from_info, work)

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> DistillOutcome:
        t0 = time.perf_counter()
        self.graph.dataset()
        weekdays = weekday_check(self.cfg, self.store.time)
        if weekdays is not None:
            self.ui.echo(weekdays["message"])
        with self.ray:
            self.teacher = self.graph.teacher()
            if self.cfg.teacher.dataset is not None:
                # trained on another network: from here on a teacher of this run's dataset
                self.teacher = self.graph.transferred(self.teacher)
            if self.cfg.serve.mode == "cache":
                # a hint student reads the teacher's hidden states from the cache too
                hint = self.cfg.distill.loss == "hint"
                self.cache = self.graph.labels(self.teacher, LABEL_SPLITS, hidden=hint)
            kd = self.student(distill=True)
            self.student(distill=False)
            for seed in extra_seeds(self.cfg):
                self.student(distill=True, seed=seed)
                self.student(distill=False, seed=seed)
            if self.cfg.distill.rounds > 1:
                self.rounds = run_rounds(
                    self.graph,
                    self.storage,
                    Round(1, self.teacher, kd),
                    LABEL_SPLITS,
                    lambda name, teacher, cache: self.student(
                        True, teacher=teacher, cache=cache, name=name
                    ),
                )
        # Ray is shut down before evaluating: idle workers would only disturb the latency timings
        self.evaluate()
        self.statistics()
        self.report()
        self.outcome.metrics = read_json(self.layout.metrics) or {}
        self.outcome.report = self.layout.report_html
        self.outcome.seconds = time.perf_counter() - t0
        return self.outcome


def run_distill(
    cfg: Config,
    *,
    storage: PathInput | None = None,
    ui: PipelineUI | None = None,
    worker_logs: bool = False,
) -> DistillOutcome:
    """Run (or resume) the distillation pipeline of ``cfg`` in run ``cfg.run.name``.

    Writes the resolved config to ``<run>/config.yaml`` and a log of this invocation to
    ``<run>/logs/``. See the module docstring for the stages.

    Args:
        cfg: the resolved config (``run.name`` set).
        storage: the storage root (default: ``$STKD_STORAGE`` or ``./storage``).
        ui: console output (default: stdout).
        worker_logs: forward the Ray workers' output to this process (a Ray cluster this
            function starts or connects to; one already connected is used as it is).
    """
    from stkd_dist.config.validate import validate_config

    validate_config(cfg)  # models, kwargs and the distillation loss, before any work
    if cfg.serve.endpoints:
        from stkd_dist.errors import ConfigError
        from stkd_dist.labels.teachers import parse_teacher

        try:
            parse_teacher(cfg.serve.endpoints)
        except ConfigError as e:
            raise ConfigError(e.message, where="serve.endpoints (--teacher)") from None
    ui = ui or PipelineUI()
    pipe = _Pipeline(cfg, storage, ui, worker_logs)
    makedirs(pipe.layout.root)
    write_config(cfg, pipe.layout.config)
    with run_log(pipe.layout.logs, "distill"):
        ui.echo(f"run {cfg.run_name!r} in {url(pipe.layout.root)}")
        return pipe.run()
