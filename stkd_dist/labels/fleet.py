"""The teacher replicas of a run: started, secured, spread, grown and shrunk, stopped.

A :class:`ReplicaFleet` owns the named Ray actors ``<prefix>-<i>``
(:class:`~stkd_dist.labels.replicas.TeacherReplica`) of one teacher; clients find them through
the endpoint ``ray:<prefix>-`` and pick up added ones while streaming. With
:class:`FleetSecurity` (the default, ``serve.secure``) the run generates a bearer token and a CA,
and issues every replica its own certificate: replicas bind their node's address and serve TLS,
so labels and the token never cross nodes in cleartext, without any user setup. The CA's key
stays on the driver; a replica receives only its own certificate and key.

Placement: ``SPREAD`` (one replica per node where the cluster allows), or
``serve.replicas_per_node`` replicas pinned to every node that has CPUs.
A replica whose process or node dies is started again by Ray (``max_restarts``) and found again
by the clients. :meth:`ReplicaFleet.add`/:meth:`ReplicaFleet.remove` are the autoscaler's
(:mod:`stkd_dist.labels.autoscale`) hands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from stkd_dist.errors import ConfigError
from stkd_dist.labels.replicas import ReplicaCompute, ReplicaCounters, TeacherReplica
from stkd_dist.serving.auth import ServerTls
from stkd_dist.serving.certs import CertificateAuthority, generate_token
from stkd_dist.serving.client import ClientOptions
from stkd_dist.serving.server import ServerConfig

log = logging.getLogger(__name__)


class FleetSecurity:
    """A run's generated token and CA (the CA's key never leaves this object)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or generate_token()
        self.ca = CertificateAuthority.create("stkd teacher replicas")

    def server_config(self, base: ServerConfig, tls_name: str) -> ServerConfig:
        """``base`` with the token and a new certificate for ``tls_name``."""
        issued = self.ca.issue([tls_name])
        return dataclasses.replace(
            base, token=self.token, tls=ServerTls(cert=issued.cert_pem, key=issued.key_pem)
        )

    def client_options(self, base: ClientOptions) -> ClientOptions:
        """``base`` trusting this run's CA and carrying its token."""
        return dataclasses.replace(base, token=self.token, tls_ca_pem=self.ca.cert_pem)


@dataclass(frozen=True)
class FleetSpec:
    """What every replica of a fleet serves and how.

    Attributes:
        checkpoint: the teacher checkpoint (an absolute reference: actors run elsewhere).
        data: the teacher's dataset (store URL).
        config: server settings (``host``/``port``/``tls`` are chosen per replica).
        cache: the label cache the replicas share (URL; None = none).
        write_through: every replica stores what it computes in ``cache``.
        storage: storage root override (URL).
        compute: device, precision and micro-batch.
        num_cpus: CPUs Ray reserves per replica.
        max_restarts: how often Ray starts a dead replica again.
        cache_hidden: a ``cache`` the replicas create also stores the teacher's hidden states
            (a student trained with ``distill.loss: hint`` reads them).
    """

    checkpoint: str
    data: str
    config: ServerConfig = field(default_factory=ServerConfig)
    cache: str | None = None
    write_through: bool = False
    storage: str | None = None
    compute: ReplicaCompute = field(default_factory=ReplicaCompute)
    num_cpus: float = 1.0
    max_restarts: int = 3
    cache_hidden: bool = False

    @property
    def num_gpus(self) -> float:
        # a replica told to use CUDA needs a GPU of its own; `auto` takes one where it runs
        return 1.0 if self.compute.device.startswith("cuda") else 0.0


class ReplicaFleet:
    """The replicas of one teacher, named ``<prefix>-<i>``.

    Args:
        spec: what the replicas serve.
        prefix: actor name prefix; clients use the endpoint :attr:`endpoint`.
        security: the run's token and CA (None = plaintext, 127.0.0.1 unless the config has a
            token or TLS).
    """

    def __init__(self, spec: FleetSpec, prefix: str, security: FleetSecurity | None) -> None:
        self.spec = spec
        self.prefix = prefix
        self.security = security
        self._lock = threading.Lock()
        self._actors: dict[str, Any] = {}
        self._next = 0
        self._retired: list[ReplicaCounters] = []

    @property
    def endpoint(self) -> str:
        """The endpoint specification clients find the replicas with."""
        return f"ray:{self.prefix}-"

    def client_options(self, base: ClientOptions) -> ClientOptions:
        """``base`` with the fleet's credentials (unchanged without security)."""
        return base if self.security is None else self.security.client_options(base)

    # -- starting --------------------------------------------------------------------------------
    def start(self, n: int, per_node: int | None = None) -> None:
        """Start ``n`` replicas (spread over the nodes), or ``per_node`` on every alive node;
        returns once every one is serving."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if n < 1 and per_node is None:
            raise ConfigError(f"must be >= 1, got {n}", where="serve.replicas")
        if per_node is None:
            names = [self._launch("SPREAD") for _ in range(n)]
        else:
            nodes = [
                node["NodeID"]
                for node in ray.nodes()
                # nodes that run work: a head started with 0 CPUs only coordinates
                if node["Alive"]
                and node["Resources"].get("CPU", 0.0) > 0
                and node["Resources"].get("CPU", 0.0) >= self.spec.num_cpus
            ]
            if not nodes:
                raise ConfigError(
                    f"no alive node has {self.spec.num_cpus} CPUs for a replica",
                    where="serve.cpus_per_replica",
                )
            # hard: Ray's soft affinity gives up on a node whose CPUs are all taken (by the
            # training workers) even for a replica that needs none. A replica restarted after
            # its process died comes back on its node; one whose node died is gone (the others
            # serve on)
            names = [
                self._launch(NodeAffinitySchedulingStrategy(node, soft=False))
                for node in nodes
                for _ in range(per_node)
            ]
        self._wait_serving(names)

    def _launch(self, strategy: Any) -> str:
        import ray

        with self._lock:
            name = f"{self.prefix}-{self._next}"
            self._next += 1
        spec = self.spec
        # certificates name the replica, not its node: clients connect by IP and check the
        # name the replica reports (its node is not known before Ray places it)
        tls_name = f"{name}.replica.stkd"
        config = dataclasses.replace(spec.config, port=0)
        if self.security is not None:
            config = self.security.server_config(config, tls_name)
        actor = (
            ray.remote(TeacherReplica)
            .options(
                name=name,
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                # a replica whose process or node dies is started again (its __init__ loads
                # the teacher and binds a new port); clients find it again through ray:PREFIX
                max_restarts=spec.max_restarts,
                scheduling_strategy=strategy,
            )
            .remote(
                spec.checkpoint,
                spec.data,
                config,
                spec.cache,
                # every replica writes through: writers never share an object (whole chunks
                # with done markers, per-writer fragments), and a window one replica stored is
                # read by the others instead of computed again
                spec.write_through,
                spec.storage,
                spec.compute,
                tls_name if self.security is not None else None,
                name,
                cache_hidden=spec.cache_hidden,
            )
        )
        with self._lock:
            self._actors[name] = actor
        return name

    def _wait_serving(self, names: list[str]) -> None:
        import ray

        # the constructor starts the server: an answer means it is serving
        ray.get([self._actors[n].address.remote() for n in names])

    def add(self) -> str:
        """Start one more replica (spread); returns its name once it serves."""
        name = self._launch("SPREAD")
        try:
            self._wait_serving([name])
        except Exception:
            self._kill(name)
            raise
        log.info("teacher replica %s started", name)
        return name

    # -- shrinking and stopping --------------------------------------------------------------------
    def remove(self, name: str, grace_s: float = 10.0) -> None:
        """Drain replica ``name`` (its streams end at a chunk and resume elsewhere) and stop it."""
        import ray

        actor = self._actors.get(name)
        if actor is None:
            raise ConfigError(f"no replica {name!r} in this fleet", where="replica")
        counters = self._counters_of([actor])
        with self._lock:
            self._retired += counters
        with contextlib.suppress(Exception):
            ray.get(actor.drain.remote(grace_s), timeout=grace_s + 30)
        self._kill(name)
        log.info("teacher replica %s removed", name)

    def _kill(self, name: str) -> None:
        import ray

        with self._lock:
            actor = self._actors.pop(name, None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(actor)

    def close(self) -> None:
        """Kill every replica."""
        for name in list(self._actors):
            self._kill(name)

    # -- observing ---------------------------------------------------------------------------------
    def size(self) -> int:
        return len(self._actors)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._actors)

    @property
    def actors(self) -> list[Any]:
        """The replicas' actor handles, in start order."""
        with self._lock:
            return list(self._actors.values())

    def idle(self, idle_s: float) -> list[str]:
        """Replicas with no active stream for ``idle_s`` seconds (oldest name first)."""
        import ray

        out = []
        for name, actor in list(self._actors.items()):
            try:
                load = ray.get(actor.load.remote(), timeout=10)
            except Exception:  # not answering: restarting, or gone; not idle
                continue
            if load.active_streams == 0 and load.idle_s >= idle_s:
                out.append(name)
        return out

    def can_add(self) -> bool:
        """Whether the cluster has the CPUs and GPUs of another replica free now."""
        import ray

        free = ray.available_resources()
        return free.get("CPU", 0.0) >= self.spec.num_cpus and (
            free.get("GPU", 0.0) >= self.spec.num_gpus
        )

    def counters(self) -> list[ReplicaCounters]:
        """Counters of every replica: removed ones as they were, live ones now (a replica that
        died lost its counts with it)."""
        with self._lock:
            retired = list(self._retired)
        return retired + self._counters_of(list(self._actors.values()))

    @staticmethod
    def _counters_of(actors: list[Any]) -> list[ReplicaCounters]:
        import ray

        out = []
        for actor in actors:
            try:
                ray.get(actor.flush.remote(), timeout=60)  # the cache's forward count is current
                out.append(ray.get(actor.info.remote(), timeout=30))
            except Exception:  # gone with its node, or not answering: its counts are unknown
                continue
        return out


def start_teacher_replicas(
    n: int,
    checkpoint: str,
    data: str,
    *,
    config: ServerConfig | None = None,
    name_prefix: str = "stkd-teacher",
    cache: str | None = None,
    write_through: bool = False,
    num_cpus: float = 1.0,
    storage: str | None = None,
    compute: ReplicaCompute | None = None,
    max_restarts: int = 3,
    security: FleetSecurity | None = None,
) -> ReplicaFleet:
    """Start ``n`` teacher servers as named Ray actors ``<name_prefix>-<i>`` (Ray initialised);
    returns their fleet once every one is serving. See :class:`FleetSpec` for the arguments."""
    import ray

    if not ray.is_initialized():
        raise ConfigError("starting teacher replicas needs a connected Ray cluster", "replicas")
    spec = FleetSpec(
        str(checkpoint),
        str(data),
        config or ServerConfig(),
        None if cache is None else str(cache),
        write_through,
        None if storage is None else str(storage),
        compute or ReplicaCompute(),
        num_cpus,
        max_restarts,
    )
    fleet = ReplicaFleet(spec, name_prefix, security)
    try:
        fleet.start(n)
    except BaseException:
        fleet.close()
        raise
    return fleet
