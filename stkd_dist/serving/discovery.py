"""Where the teacher replicas are: endpoint lists, DNS names and Ray actors.

An endpoint specification is one of

* ``host:port`` or a list / comma-separated string of them;
* ``dns:///name:port`` (or ``dns:name:port``): every address ``name`` resolves to is a replica
  (a Kubernetes headless service, a round-robin DNS record). TLS certificates are then checked
  against ``name``;
* ``ray:PREFIX``: every named Ray actor whose name starts with ``PREFIX`` and that was started by
  :func:`stkd_dist.labels.fleet.start_teacher_replicas` (the actor reports its own ``host:port``,
  and the name its TLS certificate is issued for).

Clients resolve the specification again every few seconds and after failures
(:class:`~stkd_dist.serving.placement.Placement`), so replicas that moved or were added are found
while streaming.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stkd_dist.errors import ConfigError

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


def ray_endpoints(prefix: str) -> list[Endpoint]:
    """Endpoints reported by the named Ray actors whose names start with ``prefix`` (address,
    and the name their certificate is issued for when they serve TLS)."""
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
    refs: list[Any] = []
    for entry in sorted(found, key=lambda a: a["name"]):
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            refs.append(actor.endpoint.remote())
        except (ValueError, AttributeError):  # gone meanwhile, or not a teacher replica
            continue
    endpoints = []
    for ref in refs:
        try:
            endpoints.append(ray.get(ref, timeout=30))
        except Exception as e:  # a dead replica is skipped; the others still serve
            log.warning("a teacher replica did not report its address: %s", e)
    return [e if isinstance(e, Endpoint) else Endpoint(str(e)) for e in endpoints]


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
        return ray_endpoints(self._ray)

    def __repr__(self) -> str:
        return f"EndpointSource({self.spec!r})"
