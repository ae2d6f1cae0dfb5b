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
from pathlib import Path
from typing import Any

from stkd_dist.checkpoint import resolve_checkpoint
from stkd_dist.errors import ConfigError
from stkd_dist.labels.teachers import RAY_SCHEME, TeacherSpec
from stkd_dist.location import exists, location, url
from stkd_dist.serving.cache import SERVE_MEMORY_BYTES, open_cache
from stkd_dist.serving.discovery import DEFAULT_RAY_PREFIX
from stkd_dist.serving.server import LOOPBACK, ServerConfig, TeacherServer
from stkd_dist.serving.teacher import load_teacher


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
    """

    def __init__(
        self,
        checkpoint: str,
        data: str,
        config: Any,
        cache: str | None = None,
        write_through: bool = False,
        storage: str | None = None,
    ) -> None:
        import ray

        if storage:
            os.environ["STKD_STORAGE"] = storage
        teacher = load_teacher(checkpoint, data, storage)
        host = ray.util.get_node_ip_address() if config.secured else LOOPBACK
        label_cache = None
        if cache is not None and (exists(location(cache)) or write_through):
            label_cache = open_cache(
                location(cache),
                teacher.meta,
                writable=write_through,
                memory_bytes=SERVE_MEMORY_BYTES,
                chunk_steps=teacher.reader.store.chunks[0],  # chunks follow the plan's blocks
            )
        self.server = TeacherServer(
            teacher, dataclasses.replace(config, host=host), label_cache, write_through
        )
        self.server.start()

    def address(self) -> str:
        """``host:port`` of the server."""
        return self.server.address

    def info(self) -> dict[str, Any]:
        """Counters: forward windows, batches, active streams, cached windows."""
        s = self.server.batcher_stats()
        return {
            "address": self.server.address,
            "forward_windows": self.server.teacher.forward_windows,
            "batches": s.batches,
            "max_batch": s.max_batch,
            "active_streams": self.server.active_streams,
            "cached_windows": self.server.cache.filled_windows() if self.server.cache else 0,
        }

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
) -> list[Any]:
    """Start ``n`` teacher servers as named Ray actors ``<name_prefix>-<i>``.

    Each actor loads the teacher from its checkpoint, binds a free port and reports its address;
    clients find them with the endpoint ``ray:<name_prefix>``. Returns the actor handles once every
    server is up. Ray must be initialised.

    Args:
        config: a :class:`~stkd_dist.serving.server.ServerConfig` (``host``/``port`` are chosen
            by each actor).
        cache: one label cache path (only one replica may write through to it: the first).
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
            actor_cls.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus).remote(
                str(checkpoint),
                str(data),
                cfg,
                None if cache is None else str(cache),
                # one writer per cache: concurrent writers could lose each other's rows
                write_through and i == 0,
                None if storage is None else str(storage),
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
                config=ServerConfig(token=token),
                name_prefix=prefix,
                num_cpus=num_cpus,
                storage=None if storage is None else url(storage),
            )
            out.append(TeacherSpec("stream", f"{RAY_SCHEME}{prefix}-"))
        yield tuple(out)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(actor)
