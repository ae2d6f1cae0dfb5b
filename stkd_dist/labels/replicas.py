"""Teacher replicas as Ray actors, started for the length of a run.

* :class:`TeacherReplica`: one ``TeacherServer`` inside a Ray actor (it reports its own
  ``host:port``; clients find the replicas through the endpoint ``ray:<prefix>``);
* :func:`start_teacher_replicas`: ``n`` named replica actors;
* :func:`started_replicas`: the ``ray:N`` teachers of a student started as replicas, and killed
  when the block ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stkd_dist.checkpoint import read_checkpoint, resolve_checkpoint
from stkd_dist.config.pipeline import ServeSection
from stkd_dist.errors import ConfigError
from stkd_dist.labels.teachers import RAY_SCHEME, TeacherSpec
from stkd_dist.location import Location, exists, location, url
from stkd_dist.paths import run_dir
from stkd_dist.serving.cache import SERVE_MEMORY_BYTES, open_cache
from stkd_dist.serving.discovery import DEFAULT_RAY_PREFIX
from stkd_dist.serving.forward import DEFAULT_MICRO_BATCH, SERVE_KEYS
from stkd_dist.serving.server import LOOPBACK, ServerConfig, TeacherServer
from stkd_dist.serving.teacher import load_teacher, safe_version


@dataclass(frozen=True)
class ReplicaCounters:
    """What one replica did (:meth:`TeacherReplica.info`).

    Attributes:
        address: ``host:port`` it served on.
        forward_windows: windows its teacher model ran on (padding excluded).
        batches: teacher batches it ran.
        max_batch: most windows in one batch.
        active_streams: streams in progress when asked.
        cached_windows: windows its label cache holds.
        pid: its process (a restarted replica has a new one).
    """

    address: str
    forward_windows: int
    batches: int
    max_batch: int
    active_streams: int
    cached_windows: int
    pid: int = 0


@dataclass(frozen=True)
class ReplicaCompute:
    """How replicas compute labels: ``serve.device`` (``auto`` resolved on each replica's node),
    ``serve.precision`` and ``serve.micro_batch``."""

    device: str = "cpu"
    precision: str = "fp32"
    micro_batch: int = DEFAULT_MICRO_BATCH


class TeacherReplica:
    """A teacher server running inside a Ray actor (created by :func:`start_teacher_replicas`).

    Args:
        checkpoint: teacher checkpoint reference.
        data: the teacher's dataset (store path or name).
        config: server settings; ``host`` is replaced by this node's IP when the server is
            secured (TLS or token), else by 127.0.0.1.
        cache: label cache path (None = no cache).
        write_through: fill ``cache`` while serving.
        storage: storage root override.
        compute: device, precision and micro-batch of the teacher.
    """

    def __init__(
        self,
        checkpoint: str,
        data: str,
        config: Any,
        cache: str | None = None,
        write_through: bool = False,
        storage: str | None = None,
        compute: ReplicaCompute = ReplicaCompute(),
    ) -> None:
        import ray

        if storage:
            os.environ["STKD_STORAGE"] = storage
        teacher = load_teacher(
            checkpoint,
            data,
            storage,
            device=compute.device,
            precision=compute.precision,
            micro_batch=compute.micro_batch,
            keys=SERVE_KEYS,
        )
        host = ray.util.get_node_ip_address() if config.secured else LOOPBACK
        label_cache = None
        if cache is not None and (exists(location(cache)) or write_through):
            label_cache = open_cache(
                location(cache),
                teacher.meta,
                writable=write_through,
                memory_bytes=SERVE_MEMORY_BYTES,
                chunk_steps=teacher.reader.store.chunks[0],  # chunks follow the plan's blocks
                compute=teacher.compute,
            )
        self.server = TeacherServer(
            teacher, dataclasses.replace(config, host=host), label_cache, write_through
        )
        self.server.start()

    def address(self) -> str:
        """``host:port`` of the server."""
        return self.server.address

    def info(self) -> ReplicaCounters:
        """Counters: forward windows, batches, active streams, cached windows."""
        s = self.server.batcher_stats()
        return ReplicaCounters(
            address=self.server.address,
            forward_windows=self.server.teacher.forward_windows,
            batches=s.batches,
            max_batch=s.max_batch,
            active_streams=self.server.active_streams,
            cached_windows=self.server.cache.filled_windows() if self.server.cache else 0,
            pid=os.getpid(),
        )

    def flush(self) -> None:
        """Wait until the labels computed so far (and their forward count) are in the cache."""
        self.server.flush_cache()

    def drain(self, grace_s: float | None = None) -> None:
        """Drain and stop the server (see :meth:`TeacherServer.drain`)."""
        self.server.drain(grace_s)

    def stop(self) -> None:
        self.server.stop()


def start_teacher_replicas(
    n: int,
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    config: Any = None,
    name_prefix: str = DEFAULT_RAY_PREFIX,
    cache: str | os.PathLike[str] | None = None,
    write_through: bool = False,
    num_cpus: float = 1.0,
    storage: str | os.PathLike[str] | None = None,
    compute: ReplicaCompute = ReplicaCompute(),
    max_restarts: int = 3,
) -> list[Any]:
    """Start ``n`` teacher servers as named Ray actors ``<name_prefix>-<i>``.

    Each actor loads the teacher from its checkpoint, binds a free port and reports its address;
    clients find them with the endpoint ``ray:<name_prefix>``. Returns the actor handles once every
    server is up. Ray must be initialised.

    Args:
        config: a :class:`~stkd_dist.serving.server.ServerConfig` (``host``/``port`` are chosen
            by each actor).
        cache: one label cache path (URL) every replica serves from.
        write_through: every replica stores the windows it computes in ``cache``.
        compute: the teacher's device, precision and micro-batch on every replica.
        max_restarts: how often Ray starts a replica again after its process or node died.
    """
    import ray

    if n < 1:
        raise ConfigError(f"must be >= 1, got {n}", where="replicas")
    if not ray.is_initialized():
        raise ConfigError("starting teacher replicas needs a connected Ray cluster", "replicas")
    cfg = dataclasses.replace(config or ServerConfig(), port=0)
    actor_cls = ray.remote(TeacherReplica)
    actors = []
    for i in range(n):
        actors.append(
            actor_cls.options(
                name=f"{name_prefix}-{i}",
                num_cpus=num_cpus,
                # a replica whose process or node dies is started again (its __init__ loads the
                # teacher and binds a new port); clients find it again through ray:PREFIX
                max_restarts=max_restarts,
                # one replica per node where the cluster allows, not all on the first one
                scheduling_strategy="SPREAD",
            ).remote(
                str(checkpoint),
                str(data),
                cfg,
                None if cache is None else str(cache),
                # every replica writes through: writers never share an object (whole chunks
                # with done markers, per-writer fragments), and a window one replica stored
                # is read by the others instead of computed again
                write_through,
                None if storage is None else str(storage),
                compute,
            )
        )
    # the constructor starts the server; an address answer means it is serving
    ray.get([a.address.remote() for a in actors])
    return actors


@contextlib.contextmanager
def started_replicas(
    teachers: Sequence[TeacherSpec],
    *,
    checkpoint: str | Path,
    dataset: str | Path,
    run_name: str,
    token: str | None = None,
    num_cpus: float = 0.0,
    storage: str | Path | None = None,
    config: ServerConfig | None = None,
    cache: str | None = None,
    counters: list[ReplicaCounters] | None = None,
    compute: ReplicaCompute = ReplicaCompute(),
) -> Iterator[tuple[TeacherSpec, ...]]:
    """Start the ``replicas`` teachers as Ray actors; yield all teachers, those as ``stream``.

    Each ``replicas`` teacher gets servers of ``checkpoint`` named
    ``stkd-teacher-<run>-<random>-<i>``, found by the workers' clients through the endpoint
    ``ray:<that prefix>-``; they are killed when the block ends. Ray must be initialised.

    Args:
        checkpoint: the teacher checkpoint the replicas serve (any ``resolve_checkpoint`` ref).
        dataset: the teacher's dataset (store path).
        run_name: names the actors.
        token: bearer token the replicas require. A replica binds its node's address only when
            secured (token or TLS), else 127.0.0.1: on a cluster of several nodes give a token.
        num_cpus: CPUs Ray reserves per replica (0: they share the workers' cores).
        config: the replicas' server settings (``token`` replaces its token).
        cache: a label cache (URL) the replicas share and write through to, so the teacher
            computes each window once however many epochs and students read it (None = none).
        counters: filled, when the block ends, with each replica's :class:`ReplicaCounters`.
        compute: the teacher's device, precision and micro-batch on the replicas.
    """
    import ray

    actors: list[Any] = []
    out = []
    try:
        for t in teachers:
            if t.kind != "replicas":
                out.append(t)
                continue
            prefix = f"stkd-teacher-{run_name}-{uuid.uuid4().hex[:8]}"
            actors += start_teacher_replicas(
                t.replicas,
                # absolute: the actors run in another working directory
                url(resolve_checkpoint(checkpoint, "teacher", storage)),
                url(dataset),
                config=dataclasses.replace(config or ServerConfig(), token=token),
                name_prefix=prefix,
                cache=cache,
                write_through=cache is not None,
                compute=compute,
                num_cpus=num_cpus,
                storage=None if storage is None else url(storage),
            )
            out.append(TeacherSpec("stream", f"{RAY_SCHEME}{prefix}-"))
        yield tuple(out)
    finally:
        if counters is not None and actors:
            counters.extend(_counters(actors))
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(actor)


def _counters(actors: list[Any]) -> list[ReplicaCounters]:
    """The counters of the replicas still alive (a dead one's are lost with it)."""
    import ray

    out = []
    for actor in actors:
        try:
            ray.get(actor.flush.remote(), timeout=60)  # the cache's forward count is current
            out.append(ray.get(actor.info.remote(), timeout=30))
        except Exception:  # gone with its node, or not answering: its counts are unknown
            continue
    return out


def replica_server_config(serve: ServeSection) -> ServerConfig:
    """The server settings of replicas a student starts, from the ``serve`` section."""
    return ServerConfig(batch_size=serve.batch_size)


def replica_compute(serve: ServeSection) -> ReplicaCompute:
    """How replicas a student starts compute, from the ``serve`` section."""
    return ReplicaCompute(serve.device, serve.precision, serve.micro_batch)


def replica_cache(run: str, checkpoint: str | Path, storage: str | Path | None) -> Location:
    """The label cache started replicas of teacher ``checkpoint`` write through to in run
    ``run``: ``<run>/labels/<teacher version>.zarr`` (the cache ``serve.mode: cache`` fills)."""
    info = read_checkpoint(resolve_checkpoint(checkpoint, "teacher", storage), verify=False)
    return run_dir(run, storage) / "labels" / f"{safe_version(str(info.version))}.zarr"
