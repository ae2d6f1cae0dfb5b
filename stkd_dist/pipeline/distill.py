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

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stkd_dist.config import Config, write_config
from stkd_dist.labels.replicas import replica_compute
from stkd_dist.labels.usage import label_use
from stkd_dist.location import (
    Location,
    PathInput,
    as_path,
    is_remote,
    makedirs,
    scratch_dir,
    url,
    write_bytes_atomic,
)
from stkd_dist.pipeline.findings import (
    baseline_predictors,
    extra_seeds,
    label_cost,
    model_predictor,
    seed_experiment,
    split_mae,
    teacher_check,
    with_seed,
    write_findings,
)
from stkd_dist.pipeline.outputs import MODELS, read_json, write_evaluation
from stkd_dist.pipeline.run import RunLayout, StageBook, StageRecord, config_digest
from stkd_dist.pipeline.stages import (
    RaySession,
    ensure_dataset,
    ensure_label_cache,
    label_cache_path,
    train_student_stage,
    train_teacher_stage,
)
from stkd_dist.pipeline.ui import PipelineUI, StageReport
from stkd_dist.pipeline.ui import log as pipeline_log
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
    """One invocation: the config, the run's bookkeeping, the UI and the Ray session."""

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
        self.layout = RunLayout.of(cfg.run_name, storage)
        self.book = StageBook(self.layout)
        # the epoch lines come from the experiments' history files (PipelineUI.training), so the
        # workers' own chatter is forwarded only when asked for
        self.ray = RaySession(cfg, worker_logs=worker_logs)
        self.outcome = DistillOutcome(self.layout)
        self.store: DatasetStore | None = None
        self.names = self.stage_names()

    def stage_names(self) -> list[str]:
        names = ["dataset", "teacher"]
        if self.cfg.serve.mode == "cache":
            names.append("labels")
        names += ["student_kd", "student_scratch"]
        for seed in extra_seeds(self.cfg):
            names += [seed_experiment(True, seed), seed_experiment(False, seed)]
        return [*names, "evaluate", "statistics", "report"]

    @property
    def fingerprint(self) -> str:
        assert self.store is not None, "the dataset stage runs first"
        return self.store.fingerprint

    def info(self, name: str) -> dict[str, Any]:
        """The recorded facts of a completed stage (its version, checkpoint, ...)."""
        return self.book.records[name].info

    def step(
        self,
        name: str,
        key: str,
        work: Callable[[], tuple[list[Location], dict[str, Any], str]],
        skipped_detail: Callable[[StageRecord], str],
    ) -> StageRecord:
        """Run stage ``name`` unless it completed with the same ``key`` and its outputs exist.

        ``work`` returns ``(outputs, info, detail)``; the stage is recorded once it returns.
        """
        index = self.names.index(name) + 1
        done = self.book.completed(name, key)
        if done is not None:
            self.ui.stage(index, len(self.names), name, "skipped: already complete")
            detail = skipped_detail(done)
            self.ui.echo(f"{name}: {detail}")
            self.outcome.stages.append(StageReport(name, "skipped", done.seconds, detail))
            return done
        self.ui.stage(index, len(self.names), name, self.book.why_redo(name, key))
        t0 = time.perf_counter()
        outputs, info, detail = work()
        seconds = time.perf_counter() - t0
        record = self.book.record(name, key, outputs, seconds, info)
        self.outcome.stages.append(StageReport(name, "ran", seconds, detail))
        return record

    # -- stages --------------------------------------------------------------------------------
    def dataset(self) -> None:
        index = self.names.index("dataset") + 1
        self.ui.stage(index, len(self.names), "dataset")
        t0 = time.perf_counter()
        with self.ui.progress(f"synthesising {self.cfg.data.dataset!r}") as bar:
            self.store, created = ensure_dataset(self.cfg, self.storage, on_block=bar.on_block)
        s = self.store
        detail = (
            f"{'synthesised' if created else 'opened'} {s.name!r}: {s.steps} steps x {s.nodes} "
            f"nodes x {len(s.channels)} channel(s), fingerprint {s.fingerprint}"
        )
        self.ui.echo(detail)
        status = "ran" if created else "reused"
        self.outcome.stages.append(StageReport("dataset", status, time.perf_counter() - t0, detail))

    def teacher(self) -> StageRecord:
        key = config_digest(self.cfg, ["data", "teacher", "run.seed"], fingerprint=self.fingerprint)

        def work() -> tuple[list[Location], dict[str, Any], str]:
            where = self.ray.ensure()
            self.ui.echo(f"Ray: {where}")
            epochs = self.cfg.teacher.schedule.epochs
            with self.ui.training(self.layout.experiment("teacher"), "teacher", epochs):
                res = train_teacher_stage(self.cfg, self.storage, echo=self.ui.echo)
            return (
                [self.layout.experiment("teacher") / "best.json", res.checkpoint],
                _model_info(self.layout, res),
                _model_detail(res.version, res.val_mae),
            )

        return self.step("teacher", key, work, _recorded_model_detail)

    def labels(self) -> StageRecord:
        teacher = self.info("teacher")
        # a hint student needs the hidden states in the cache: part of the key only then, so
        # the labels of runs with other losses keep their key
        hidden = {"hidden": True} if self.cfg.distill.loss == "hint" else {}
        key = config_digest(
            self.cfg, [], teacher=teacher["version"], splits=list(LABEL_SPLITS), **hidden
        )

        def work() -> tuple[list[Location], dict[str, Any], str]:
            assert self.store is not None
            with self.ui.progress("teacher soft labels (windows)") as bar:
                cache = ensure_label_cache(
                    self.layout.root / teacher["checkpoint"],
                    self.store.path,
                    label_cache_path(self.layout, teacher["version"]),
                    LABEL_SPLITS,
                    batch_size=self.cfg.serve.batch_size,
                    compute=replica_compute(self.cfg.serve),
                    progress=bar.advance,
                    on_start=bar.start,
                    # a hint student reads the teacher's hidden states from the cache too
                    hidden=self.cfg.distill.loss == "hint",
                )
            detail = (
                f"{sum(cache.windows.values())} windows of teacher {cache.version}; "
                f"{cache.forward_windows} teacher forward passes"
                + ("" if cache.computed else " (existing cache reused)")
            )
            info = {
                "path": self.layout.relative(cache.path),
                "version": cache.version,
                "windows": cache.windows,
                "forward_windows": cache.forward_windows,
            }
            return [cache.path], info, detail

        return self.step("labels", key, work, lambda r: _cache_detail(r.info))

    def student(self, distill: bool, seed: int | None = None) -> StageRecord:
        """The distilled (or scratch) student; ``seed``: a further seed of ``run.seeds``."""
        cfg = self.cfg if seed is None else with_seed(self.cfg, seed)
        name = "student_kd" if distill else "student_scratch"
        if seed is not None:
            name = seed_experiment(distill, seed)
        if distill:
            teacher = self.info("teacher")
            sections = ["data", "student", "distill", "run.seed", "serve.mode", "serve.wire_dtype"]
            extra: dict[str, Any] = {"teacher": teacher["version"]}
            if self.cfg.serve.mode == "stream":
                extra["endpoints"] = self.cfg.serve.endpoints
        else:
            sections, extra = ["data", "student", "distill.task", "run.seed"], {}
        key = config_digest(cfg, sections, fingerprint=self.fingerprint, **extra)

        def work() -> tuple[list[Location], dict[str, Any], str]:
            where = self.ray.ensure()
            self.ui.echo(f"Ray: {where}")
            labels = teacher_ckpt = None
            if distill:
                teacher_ckpt = self.layout.root / self.info("teacher")["checkpoint"]
                if self.cfg.serve.mode == "cache":
                    labels = self.layout.root / self.info("labels")["path"]
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
                    experiment=None if seed is None else name,
                )
            if distill and seed is None:
                self._check_teacher_used()
            return (
                [self.layout.experiment(name) / "best.json", res.checkpoint],
                _model_info(self.layout, res),
                _model_detail(res.version, res.val_mae),
            )

        return self.step(name, key, work, _recorded_model_detail)

    def _check_teacher_used(self) -> None:
        """Warn when the distilled student's teacher is not the run's own (given endpoints)."""
        from stkd_dist.train.student import student_teachers

        used = student_teachers(self.layout.experiment("student_kd")) or {}
        versions = [t.get("version") for t in used.get("teachers", [])]
        mine = self.info("teacher")["version"]
        if versions and versions != [mine]:
            self.ui.echo(
                f"warning: the student was distilled from teacher(s) {versions}, the report's "
                f"teacher is the run's own {mine}"
            )

    def evaluate(self) -> StageRecord:
        assert self.store is not None
        versions = {m: self.info(m)["version"] for m in MODELS}
        # the sensor locations are not part of the data's fingerprint, but the evaluation writes
        # them for the error map: a store re-ingested with (other) --locations is evaluated again
        locations = self.store.locations()
        where = None if locations is None else hashlib.sha256(locations.tobytes()).hexdigest()
        key = config_digest(
            self.cfg,
            ["data", "evaluate"],
            fingerprint=self.fingerprint,
            locations=where,
            **versions,
        )
        return self.step("evaluate", key, self._evaluate, lambda r: r.info.get("detail", ""))

    def _evaluate(self) -> tuple[list[Location], dict[str, Any], str]:
        from stkd_dist.checkpoint import load_forecaster
        from stkd_dist.pipeline.evaluate_all import evaluate_all
        from stkd_dist.train.loop import build_reader

        assert self.store is not None
        store = self.store
        models = {
            m: load_forecaster(self.layout.root / self.info(m)["checkpoint"], role=m)[0]
            for m in MODELS
        }
        reader = build_reader(self.cfg, store)
        with self.ui.progress("evaluating on the test split (windows)") as bar:
            ev = evaluate_all(
                reader, models, self.cfg.evaluate, self.cfg.data.eval_batch_size, bar.update
            )
        outputs = write_evaluation(self.layout, ev, store, MODELS)
        kd, tm = ev.metrics["student_kd"].mae, ev.metrics["teacher"].mae
        detail = f"test MAE: teacher {tm:.4f}, distilled student {kd:.4f}"
        return outputs, {"detail": detail}, detail

    def statistics(self) -> StageRecord:
        seeds = extra_seeds(self.cfg)
        versions = {
            n: self.info(n)["version"]
            for s in seeds
            for n in (seed_experiment(True, s), seed_experiment(False, s))
        }
        key = config_digest(
            self.cfg,
            ["data"],
            evaluated=self.book.records["evaluate"].finished,
            teacher_val_mae=self.info("teacher")["val_mae"],
            **versions,
        )
        return self.step("statistics", key, self._statistics, lambda r: r.info.get("detail", ""))

    def _statistics(self) -> tuple[list[Location], dict[str, Any], str]:
        from stkd_dist.checkpoint import load_forecaster
        from stkd_dist.stats import kd_vs_scratch
        from stkd_dist.train.loop import build_reader

        assert self.store is not None
        reader = build_reader(self.cfg, self.store)
        batch = self.cfg.data.eval_batch_size
        metrics = read_json(self.layout.metrics) or {}
        with self.ui.status("validation MAE of the naive baselines ..."):
            base = split_mae(reader, baseline_predictors(reader), "val", batch)
        check = teacher_check(float(self.info("teacher")["val_mae"]), base)
        self.ui.echo(check["message"])
        findings: dict[str, Any] = {"teacher_check": check}
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
                        model = load_forecaster(
                            self.layout.root / self.info(name)["checkpoint"], role=name
                        )[0]
                        mae = split_mae(reader, {name: model_predictor(model)}, "test", batch)
                        out.append(mae[name])
                        bar.advance()
            entry = kd_vs_scratch(
                kd, scratch, metrics["teacher"]["mae"], [self.cfg.run.seed, *seeds]
            )
            findings["kd_vs_scratch"] = entry
            self.ui.echo(entry["verdict"])
            detail = entry["verdict"]
        cost = label_cost(
            self.cfg.serve.mode,
            [u for u in map(label_use, self._distilled_experiments()) if u is not None],
            self.info("labels") if "labels" in self.names else None,
        )
        if cost is not None:
            findings["labels"] = cost
        write_findings(self.layout.metrics, findings)
        return [self.layout.metrics], {"detail": detail}, detail

    def _distilled_experiments(self) -> list[Location]:
        """The experiments of the run's distilled students (every seed)."""
        names = ["student_kd", *(seed_experiment(True, s) for s in extra_seeds(self.cfg))]
        return [self.layout.experiment(n) for n in names]

    def report(self) -> StageRecord:
        key = config_digest(self.cfg, [], evaluated=self.book.records["statistics"].finished)

        def work() -> tuple[list[Location], dict[str, Any], str]:
            from stkd_dist.report import write_report

            with self.ui.status("rendering the report ..."):
                md, html = write_report(self.layout.root)
            return [md, html], {"html": self.layout.relative(html)}, str(html)

        return self.step("report", key, work, lambda r: str(self.layout.root / r.info["html"]))

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> DistillOutcome:
        t0 = time.perf_counter()
        self.dataset()
        with self.ray:
            self.teacher()
            if "labels" in self.names:
                self.labels()
            self.student(distill=True)
            self.student(distill=False)
            for seed in extra_seeds(self.cfg):
                self.student(distill=True, seed=seed)
                self.student(distill=False, seed=seed)
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
    with _log_file(pipe.layout):
        ui.echo(f"run {cfg.run_name!r} in {url(pipe.layout.root)}")
        return pipe.run()


def _model_info(layout: RunLayout, res: Any) -> dict[str, Any]:
    return {
        "checkpoint": layout.relative(res.checkpoint),
        "version": res.version,
        "val_mae": res.val_mae,
        "epochs": res.epochs,
        "trained": res.trained,
    }


def _model_detail(version: str, val_mae: float) -> str:
    return f"best {version}, val MAE {val_mae:.4f}"


def _recorded_model_detail(record: StageRecord) -> str:
    return _model_detail(record.info["version"], float(record.info["val_mae"]))


def _cache_detail(info: dict[str, Any]) -> str:
    return (
        f"{sum(info['windows'].values())} windows of teacher {info['version']}; "
        f"{info['forward_windows']} teacher forward passes"
    )


@contextlib.contextmanager
def _log_file(layout: RunLayout) -> Iterator[Location]:
    """Log this invocation (the pipeline's lines and Python logging) to ``<run>/logs/``.

    With an object-store root the log is written to a local scratch file (logging appends line by
    line) and uploaded when the invocation ends, also when it fails.
    """
    name = f"distill-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dest = layout.logs / name
    scratch = scratch_dir("log") if is_remote(dest) else None
    makedirs(layout.logs)
    path = as_path(dest) if scratch is None else scratch / name
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = (logging.getLogger(), pipeline_log)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level > logging.INFO or lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
    try:
        yield dest
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
        if scratch is not None:
            try:
                write_bytes_atomic(dest, path.read_bytes())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
