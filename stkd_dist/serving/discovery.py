"""Where the teacher replicas are: endpoint lists, DNS names and Ray actors.

An endpoint specification is one of

* ``host:port`` or a list / comma-separated string of them;
* ``dns:///name:port`` (or ``dns:name:port``): every address ``name`` resolves to is a replica
  (a Kubernetes headless service, a round-robin DNS record). TLS certificates are then checked
  against ``name``;
* ``ray:PREFIX``: every named Ray actor whose name starts with ``PREFIX`` and that was started by
  :func:`start_teacher_replicas` (the actor reports its own ``host:port``).

:class:`EndpointSource` resolves the specification again whenever the client has tried every
known replica, so replicas that moved or were added are found after a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stkd_dist.errors import ConfigError
from stkd_dist.location import exists, location

log = logging.getLogger(__name__)

DEFAULT_RAY_PREFIX = "stkd-teacher"


@dataclass(frozen=True)
class Endpoint:
    """One replica: ``address`` = ``host:port``; ``tls_name`` = the name its certificate is for
    when that is not the host in ``address``."""

    address: str
    tls_name: str | None = None


def _split_host_port(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}", where=where)
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_dns(name: str, port: int) -> list[str]:
    """``host:port`` of every address ``name`` resolves to (IPv4 first, duplicates removed)."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve {name!r} ({e.strerror})", where=f"dns:///{name}") from e
    seen: dict[str, None] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _, _, _, sockaddr in infos:
            if fam == family:
                seen.setdefault(_join(str(sockaddr[0]), port))
    return list(seen)


def ray_endpoints(prefix: str) -> list[str]:
    """Addresses reported by the named Ray actors whose names start with ``prefix``."""
    import ray

    if not ray.is_initialized():
        raise ConfigError(
            "ray: endpoints need a connected Ray cluster (call ray.init first)", f"ray:{prefix}"
        )
    found = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if str(a["name"]).startswith(prefix)
    ]
    refs = []
    for entry in sorted(found, key=lambda a: a["name"]):
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            refs.append(actor.address.remote())
        except (ValueError, AttributeError):  # gone meanwhile, or not a teacher replica
            continue
    addresses = []
    for ref in refs:
        try:
            addresses.append(str(ray.get(ref, timeout=30)))
        except Exception as e:  # a dead replica is skipped; the others still serve
            log.warning("a teacher replica did not report its address: %s", e)
    return addresses


class EndpointSource:
    """A parsed endpoint specification that can be resolved (again) to replicas.

    Args:
        spec: see the module docstring.

    Raises:
        ConfigError: a malformed specification.
    """

    def __init__(self, spec: str | Sequence[str]) -> None:
        self.spec = spec
        self._static: list[Endpoint] | None = None
        self._dns: tuple[str, int] | None = None
        self._ray: str | None = None
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        items = [s for s in items if s]
        if not items:
            raise ConfigError("no teacher endpoints given", where="endpoints")
        if len(items) == 1 and items[0].startswith("dns:"):
            target = items[0].removeprefix("dns:").lstrip("/")
            self._dns = _split_host_port(target, items[0])
        elif len(items) == 1 and items[0].startswith("ray:"):
            self._ray = items[0].removeprefix("ray:") or DEFAULT_RAY_PREFIX
        else:
            out = []
            for item in items:
                host, port = _split_host_port(item, "endpoints")
                out.append(Endpoint(_join(host, port)))
            self._static = out

    def resolve(self) -> list[Endpoint]:
        """The current replicas (may be empty for ``ray:`` when none is running)."""
        if self._static is not None:
            return list(self._static)
        if self._dns is not None:
            name, port = self._dns
            return [Endpoint(a, tls_name=name) for a in resolve_dns(name, port)]
        assert self._ray is not None
        return [Endpoint(a) for a in ray_endpoints(self._ray)]

    def __repr__(self) -> str:
        return f"EndpointSource({self.spec!r})"


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

        from stkd_dist.serving.cache import SERVE_MEMORY_BYTES, open_cache
        from stkd_dist.serving.server import LOOPBACK, TeacherServer
        from stkd_dist.serving.teacher import load_teacher

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

    from stkd_dist.serving.server import ServerConfig

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
