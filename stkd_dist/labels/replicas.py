"""One teacher replica as a Ray actor, and its settings from the ``serve`` section.

* :class:`TeacherReplica`: one ``TeacherServer`` inside a Ray actor (it reports its own
  ``host:port`` and certificate name; clients find the replicas through ``ray:<prefix>``);
* :class:`ReplicaCounters`: what a replica did;
* :func:`replica_server_config`, :func:`replica_compute`, :func:`replica_cache`: a student's
  replicas' settings.

The fleet of replicas of a run (start, add, remove, security) is :mod:`stkd_dist.labels.fleet`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from stkd_dist.checkpoint import read_checkpoint, resolve_checkpoint
from stkd_dist.config.pipeline import ServeSection
from stkd_dist.location import Location, PathInput, exists, location
from stkd_dist.paths import run_dir
from stkd_dist.serving.cache import SERVE_MEMORY_BYTES, open_cache
from stkd_dist.serving.discovery import Endpoint
from stkd_dist.serving.forward import DEFAULT_MICRO_BATCH, SERVE_KEYS
from stkd_dist.serving.load import LoadSnapshot
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
        name: its Ray actor name.
        streams_served: streams it admitted.
        node_id: the Ray node it runs on.
        secured: it required TLS or a token.
    """

    address: str
    forward_windows: int
    batches: int
    max_batch: int
    active_streams: int
    cached_windows: int
    pid: int = 0
    name: str = ""
    streams_served: int = 0
    node_id: str = ""
    secured: bool = False


@dataclass(frozen=True)
class ReplicaCompute:
    """How replicas compute labels: ``serve.device`` (``auto`` resolved on each replica's node),
    ``serve.precision``, ``serve.micro_batch`` and ``serve.threads`` (torch intra-op threads;
    None = what the actor's process has)."""

    device: str = "cpu"
    precision: str = "fp32"
    micro_batch: int = DEFAULT_MICRO_BATCH
    threads: int | None = None


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
        tls_name: the name ``config.tls``'s certificate is issued for; clients check the
            certificate against it (they connect by IP).
        name: the actor's name (in counters).
        cache_hidden: a ``cache`` created here also stores the teacher's hidden states.
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
        tls_name: str | None = None,
        name: str = "",
        cache_hidden: bool = False,
    ) -> None:
        import ray

        self.tls_name = tls_name
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        if storage:
            os.environ["STKD_STORAGE"] = storage
        if compute.threads:
            # before the teacher loads: the server's forward thread takes this count
            torch.set_num_threads(compute.threads)
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
                hidden=cache_hidden,
            )
        self.server = TeacherServer(
            teacher, dataclasses.replace(config, host=host), label_cache, write_through
        )
        self.server.start()

    def address(self) -> str:
        """``host:port`` of the server."""
        return self.server.address

    def endpoint(self) -> Endpoint:
        """Where clients reach this replica (see :func:`~stkd_dist.serving.discovery.ray_endpoints`)."""
        return Endpoint(self.server.address, tls_name=self.tls_name)

    def load(self) -> LoadSnapshot:
        """Active streams, outstanding windows and idle time (the autoscaler's view)."""
        return self.server.load.snapshot()

    def info(self) -> ReplicaCounters:
        """Counters: forward windows, batches, active streams, cached windows."""
        s = self.server.batcher_stats()
        load = self.server.load.snapshot()
        return ReplicaCounters(
            address=self.server.address,
            forward_windows=self.server.teacher.forward_windows,
            batches=s.batches,
            max_batch=s.max_batch,
            active_streams=self.server.active_streams,
            cached_windows=self.server.cache.filled_windows() if self.server.cache else 0,
            pid=os.getpid(),
            name=self.name,
            streams_served=load.streams_served,
            node_id=self.node_id,
            secured=self.server.config.secured,
        )

    def flush(self) -> None:
        """Wait until the labels computed so far (and their forward count) are in the cache."""
        self.server.flush_cache()

    def drain(self, grace_s: float | None = None) -> None:
        """Drain and stop the server (see :meth:`TeacherServer.drain`)."""
        self.server.drain(grace_s)

    def stop(self) -> None:
        self.server.stop()


def replica_server_config(serve: ServeSection) -> ServerConfig:
    """The server settings of replicas a student starts, from the ``serve`` section (the token
    and TLS are the run's own: :class:`~stkd_dist.labels.fleet.FleetSecurity`)."""
    return ServerConfig(batch_size=serve.batch_size, max_streams=serve.max_streams)


def replica_compute(serve: ServeSection) -> ReplicaCompute:
    """How replicas a student starts compute, from the ``serve`` section."""
    return ReplicaCompute(serve.device, serve.precision, serve.micro_batch, serve.threads)


def replica_cache(run: str, checkpoint: PathInput, storage: PathInput | None) -> Location:
    """The label cache started replicas of teacher ``checkpoint`` write through to in run
    ``run``: ``<run>/labels/<teacher version>.zarr`` (the cache ``serve.mode: cache`` fills)."""
    info = read_checkpoint(resolve_checkpoint(checkpoint, "teacher", storage), verify=False)
    return run_dir(run, storage) / "labels" / f"{safe_version(str(info.version))}.zarr"
