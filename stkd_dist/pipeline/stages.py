"""The building blocks of a distillation run, shared by ``stkd distill`` and ``stkd sweep``.

Each function does one stage's work and is safe to call again: it reuses what a previous call left
(a synthesised dataset, a complete teacher run, a complete label cache) instead of redoing it.

* :func:`ensure_dataset`: open the config's store, synthesising the embedded ``demo`` default when
  it is absent;
* :func:`train_teacher_stage`: DDP teacher training (``stkd train-teacher``'s code path);
* :func:`train_student_stage`: DDP student training, distilled or not (``stkd train-student``'s);
* :func:`ensure_label_cache`: the teacher's soft labels for every window of some splits, computed
  once into the run's label cache (every student, every sweep trial reads them from there);
* :class:`RaySession`: one Ray connection for all stages of a command, started only when a stage
  needs it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stkd_dist.config import Config
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.labels.replicas import ReplicaCompute
from stkd_dist.location import Location, PathInput, exists, location, read_bytes, url
from stkd_dist.paths import dataset_path, resolve_dataset
from stkd_dist.pipeline.run import RunLayout
from stkd_dist.storage import DatasetStore, open_store
from stkd_dist.synth import SynthSpec, ensure_synthetic

log = logging.getLogger(__name__)

#: The embedded default dataset: its name, and the parameters it is synthesised with.
DEMO_DATASET = "demo"
DEMO_NODES = 50
DEMO_STEPS = 8064  # four weeks at 5 min

Echo = Callable[[str], None]
BlockCallback = Callable[[int, int], None]


#: The embedded default's traffic dynamics: 80 % of a sensor's flow arrives from its neighbours'
#: flow 10 min earlier, and demand swings (std 0.35, correlated over 3 h) that a time-of-week mean
#: cannot know. With the generator's defaults (50 %, 0.12 over 30 min) the series are so periodic
#: that the historical average beats a briefly trained teacher, and the demo would show nothing.
DEMO_DYNAMICS: dict[str, Any] = {"diffusion": 0.8, "noise_std": 0.35, "noise_tau_minutes": 180.0}


def demo_spec(nodes: int = DEMO_NODES, steps: int = DEMO_STEPS, seed: int = 0) -> SynthSpec:
    """The parameters of the embedded default dataset (:data:`DEMO_DYNAMICS`)."""
    return SynthSpec(nodes=nodes, steps=steps, seed=seed, **DEMO_DYNAMICS)


def synthesize_demo(
    spec: SynthSpec,
    storage: PathInput | None = None,
    on_block: BlockCallback | None = None,
) -> tuple[Location, bool]:
    """The ``demo`` dataset under the storage root: ``(path, created)``.

    Generated from ``spec`` when absent, damaged or made with other parameters; reused otherwise.
    """
    return ensure_synthetic(
        spec, dataset_path(DEMO_DATASET, storage), name=DEMO_DATASET, on_block=on_block
    )


def ensure_dataset(
    cfg: Config,
    storage: PathInput | None = None,
    on_block: BlockCallback | None = None,
) -> tuple[DatasetStore, bool]:
    """Open ``cfg.data.dataset``: ``(store, synthesised)``.

    The embedded default (``data.dataset: demo``) is synthesised with :func:`demo_spec` when it
    does not exist yet; any other missing dataset raises :class:`StoreError` saying how to make it.
    """
    ref = cfg.data.dataset
    try:
        return open_store(resolve_dataset(ref, storage)), False
    except StoreError:
        if ref != DEMO_DATASET:
            raise
    path, created = synthesize_demo(demo_spec(), storage, on_block)
    return open_store(path), created


@dataclass(frozen=True)
class TrainResult:
    """A trained model of the run (teacher or student).

    Attributes:
        checkpoint: its best checkpoint directory.
        version: its version (``<run>-e<epoch>-<digest>``; what clients and caches check).
        val_mae: its validation MAE.
        epochs: epochs trained in all.
        trained: False when the run was already complete and nothing was trained.
    """

    checkpoint: Location
    version: str
    val_mae: float
    epochs: int
    trained: bool


def train_result(outcome: Any) -> TrainResult:
    """The stage record of a trainer's outcome (best checkpoint, version, epochs)."""
    best = outcome.best
    return TrainResult(
        checkpoint=best.path,
        version=best.version,
        val_mae=float(best.val_mae) if best.val_mae is not None else math.nan,
        epochs=outcome.epochs_done,
        trained=outcome.trained,
    )


def train_teacher_stage(
    cfg: Config, storage: PathInput | None = None, echo: Echo = print
) -> TrainResult:
    """Train (or resume, or just report) the run's teacher (``stkd train-teacher``'s code path).

    Uses the Ray cluster this process is connected to (see :class:`RaySession`).
    """
    from stkd_dist.train.teacher import train_teacher

    return train_result(train_teacher(cfg, storage=storage, echo=echo))


def train_feedback_stage(
    cfg: Config,
    *,
    start: PathInput,
    student_labels: PathInput,
    experiment: str,
    storage: PathInput | None = None,
    echo: Echo = print,
) -> TrainResult:
    """Fine-tune teacher ``start`` on the targets and a student's predictions (a further round
    of ``distill.rounds``; see :mod:`stkd_dist.train.feedback`)."""
    from stkd_dist.train.feedback import train_feedback_teacher

    outcome = train_feedback_teacher(
        cfg,
        start=start,
        student_labels=student_labels,
        experiment=experiment,
        storage=storage,
        echo=echo,
    )
    return train_result(outcome)


def train_student_stage(
    cfg: Config,
    *,
    distill: bool,
    teacher: PathInput | None = None,
    labels: PathInput | None = None,
    storage: PathInput | None = None,
    echo: Echo = print,
    experiment: str | None = None,
) -> TrainResult:
    """Train (or resume, or report) the run's student (``stkd train-student``'s code path).

    ``experiment`` names the student's experiment in the run (None: ``student_kd`` /
    ``student_scratch``; further seeds of ``stkd distill --seeds`` have their own).

    Where the distilled student's soft labels come from (``distill=True``):

    * ``labels``: a label cache (see :func:`ensure_label_cache`), read without a server;
    * else ``cfg.serve.endpoints``: teacher servers already running;
    * else ``cfg.serve.replicas`` teacher servers of checkpoint ``teacher``, started as Ray actors
      for the duration of the training and streaming each worker its shard's labels.

    ``distill=False`` trains the same student on the targets only (``student_scratch``).
    """
    from stkd_dist.labels.started import replica_plan
    from stkd_dist.labels.teachers import TeacherSpec, parse_teacher
    from stkd_dist.serving.auth import resolve_token
    from stkd_dist.serving.client import ClientOptions
    from stkd_dist.train.student import StudentRequest, train_student

    serve = cfg.serve
    # resolved here: workers on other nodes do not see this process's environment
    client = ClientOptions(
        token=resolve_token(None),
        wire_dtype=serve.wire_dtype,
        # read here, sent to the workers with the options: no node needs a copy of the file
        tls_ca_pem=None if serve.tls_ca is None else _read_ca(serve.tls_ca),
    )
    if not distill:
        request = StudentRequest(distill=False, client=client, experiment=experiment)
    elif labels is not None:
        spec = TeacherSpec("cache", url(labels))
        request = StudentRequest(teachers=(spec,), client=client, experiment=experiment)
    elif serve.endpoints:
        request = StudentRequest(
            teachers=(parse_teacher(serve.endpoints),), client=client, experiment=experiment
        )
    else:
        if teacher is None:
            raise ConfigError("starting teacher replicas needs the teacher checkpoint", "teacher")
        request = StudentRequest(
            teachers=(TeacherSpec("replicas", replicas=serve.replicas),),
            checkpoint=url(teacher),
            client=client,
            replicas=replica_plan(serve),
            experiment=experiment,
            write_through=serve.write_through,
        )
    return train_result(train_student(cfg, request, storage=storage, echo=echo))


def _read_ca(ref: str) -> bytes:
    """The PEM bytes of ``serve.tls_ca``."""
    try:
        data = read_bytes(location(ref))
    except (OSError, StoreError) as e:
        raise ConfigError(f"cannot read the CA certificate {ref!r} ({e})", "serve.tls_ca") from e
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{ref!r} is not a PEM certificate", where="serve.tls_ca")
    return data


def label_cache_path(layout: RunLayout, version: str) -> Location:
    """Where the run keeps the label cache of teacher ``version``: ``<run>/labels/<version>.zarr``."""
    from stkd_dist.serving.teacher import safe_version

    return layout.labels / f"{safe_version(version)}.zarr"


@dataclass(frozen=True)
class CacheResult:
    """A complete label cache.

    Attributes:
        path: the cache.
        version: the teacher version it holds labels of.
        windows: windows it holds, per split.
        forward_windows: teacher forward passes (windows) recorded in the cache: what filling it
            cost, once.
        computed: whether this call computed it (False: an existing complete cache was reused).
    """

    path: Location
    version: str
    windows: dict[str, int]
    forward_windows: int
    computed: bool


def ensure_label_cache(
    checkpoint: PathInput,
    dataset: PathInput,
    dest: PathInput,
    splits: Sequence[str] = ("train",),
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    compute: ReplicaCompute | None = None,
    hidden: bool = False,
) -> CacheResult:
    """The labels of teacher ``checkpoint`` for every window of ``splits``, cached at ``dest``.

    An existing cache at ``dest`` of the same teacher and dataset holding every window of
    ``splits`` (and the hidden states, with ``hidden``) is reused as it is (no teacher forward
    pass); anything else there is replaced by a freshly computed cache (written under a temporary
    name, then renamed).

    Args:
        checkpoint: the teacher checkpoint (directory, run directory or run name).
        dataset: the teacher's dataset (store path or name).
        dest: the cache path (see :func:`label_cache_path`).
        splits: the splits whose windows are labelled.
        batch_size: windows per teacher forward pass.
        progress: called with the number of windows labelled after each forward pass.
        on_start: called once with the total number of windows when computing starts.
        compute: the ``serve`` section's device, precision and micro-batch: the cache records
            them, and replicas writing through to it must compute alike.
        hidden: the cache also holds the teacher's hidden states (``distill.loss: hint``).
    """
    from stkd_dist.serving.cache import LabelCache
    from stkd_dist.serving.precompute import TeacherSource, precompute_labels
    from stkd_dist.serving.teacher import load_teacher

    compute = compute or ReplicaCompute()
    teacher = load_teacher(checkpoint, dataset, micro_batch=compute.micro_batch)
    dest = location(dest)
    if exists(dest):
        try:
            cache = LabelCache(dest)
            cache.check_matches(teacher.meta)
            complete = all(cache.is_complete(s) for s in splits if len(teacher.meta.splits[s]))
            if complete and (cache.hidden_dim or not hidden):
                return _cache_result(cache, splits, computed=False)
            if complete:
                log.info("recomputing the label cache %s with the hidden states", url(dest))
        except StoreError as e:
            log.info("recomputing the label cache %s: %s", url(dest), e.message)
    if on_start is not None:
        on_start(sum(len(teacher.meta.splits[s]) for s in splits))
    # with a Ray cluster connected the fill fans out over its workers, each loading the teacher
    cache = precompute_labels(
        teacher,
        dest,
        list(splits),
        batch_size=batch_size,
        overwrite=True,
        progress=progress,
        source=TeacherSource(url(checkpoint), url(dataset)),
        # a fill names a device kind; cuda:<i> is for one server process
        device=compute.device.split(":", 1)[0],
        precision=compute.precision,
        hidden=hidden,
    )
    return _cache_result(cache, splits, computed=True)


def _cache_result(cache: object, splits: Sequence[str], computed: bool) -> CacheResult:
    from stkd_dist.serving.cache import LabelCache

    assert isinstance(cache, LabelCache)
    return CacheResult(
        path=cache.path,
        version=cache.version,
        windows={s: cache.filled_windows(s) for s in splits},
        forward_windows=cache.forward_windows,
        computed=computed,
    )


class RaySession:
    """One Ray connection for the stages of a command, started on first use.

    An already initialised Ray (a test's) is used as it is and left running. Otherwise
    :meth:`ensure` connects to ``cluster.address`` / ``$RAY_ADDRESS`` or starts a local cluster
    with CPUs for the training workers plus the teacher replicas, and :meth:`close` shuts it down.

    Args:
        cfg: the run's config (``cluster`` and ``serve`` sections size a local cluster).
        worker_logs: forward the output of Ray's workers and actors to this process (Ray's
            ``log_to_driver``); it stays in the Ray session's log files either way.
        sweep: the session of ``stkd sweep`` (a local cluster also has room for the trials and
            the ``sweep`` section's label replicas).
    """

    def __init__(self, cfg: Config, worker_logs: bool = True, sweep: bool = False) -> None:
        self.cfg = cfg
        self.worker_logs = worker_logs
        self.sweep = sweep
        self._owned = False
        self.where: str | None = None

    def ensure(self) -> str:
        """Connect (once); returns a description of the cluster."""
        import ray

        from stkd_dist.train.ray_session import cluster_address

        if self.where is not None:
            return self.where
        if ray.is_initialized():
            self.where = "the Ray cluster this process is connected to"
            return self.where
        address = cluster_address(self.cfg.cluster)
        if address:
            ray.init(address=address, log_to_driver=self.worker_logs)
            self.where = f"the Ray cluster at {address}"
        else:
            c, s = self.cfg.cluster, self.cfg.serve
            cores = os.cpu_count() or 1
            replicas = s.replicas if s.mode == "stream" and s.endpoints is None else 0
            # every worker and replica gets its reservation even on a machine with fewer cores
            # (they then share cores instead of waiting forever for resources)
            need = c.max_workers * c.cpus_per_worker + math.ceil(replicas * s.cpus_per_replica)
            cpus = max(need, cores)
            sweep = self.cfg.sweep
            if self.sweep:
                # the trials get the machine's cores (at least one trial's workers), the label
                # replicas their reservation on top: streaming takes no trial's place
                trial = max(sweep.trial_workers * sweep.cpus_per_worker, cores)
                streamed = sweep.label_replicas * s.cpus_per_replica
                cpus = max(cpus, trial + math.ceil(streamed if sweep.labels == "stream" else 0))
            # A data-parallel trial's Ray Train run is ended with its Tune actor; Ray Train's
            # placement-group cleaner then frees the workers' reservation once the State API
            # (served by the dashboard) says the run's controller is gone. Without it the
            # reservation outlives the trial and the trials after it wait forever.
            dashboard = sweep.trial_workers > 1
            ray.init(num_cpus=cpus, include_dashboard=dashboard, log_to_driver=self.worker_logs)
            self.where = f"a local Ray cluster ({cpus} CPUs)"
        self._owned = True
        return self.where

    def close(self) -> None:
        """Shut down a cluster this session started or connected to."""
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False
        self.where = None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
