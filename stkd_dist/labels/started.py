"""Teachers a student starts for the length of its training: ``ray:N`` replicas and their
autoscaler.

:func:`started_replicas` turns every ``replicas`` teacher into a :class:`ReplicaFleet` and yields
:class:`StartedTeachers`: the teachers as ``stream`` teachers of the fleets' endpoints (each with
the client options that trust its fleet), the name of the wait meter the students report their
label wait to (when ``serve.autoscale`` is set), and, once the block ends, the replicas' counters
and the autoscaler's decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from stkd_dist.checkpoint import resolve_checkpoint
from stkd_dist.config.pipeline import AutoscaleSection, ServeSection
from stkd_dist.errors import ConfigError
from stkd_dist.labels.autoscale import Autoscaler, ScaleDecision, WaitMeter
from stkd_dist.labels.fleet import FleetSecurity, FleetSpec, ReplicaFleet
from stkd_dist.labels.replicas import (
    ReplicaCompute,
    ReplicaCounters,
    replica_compute,
    replica_server_config,
)
from stkd_dist.labels.teachers import TeacherSpec
from stkd_dist.location import PathInput, url
from stkd_dist.serving.client import ClientOptions
from stkd_dist.serving.server import ServerConfig


@dataclass(frozen=True)
class ReplicaPlan:
    """How a student's replicas are started (from the ``serve`` section).

    Attributes:
        config: server settings (batching, admission).
        compute: device, precision, micro-batch.
        num_cpus: CPUs Ray reserves per replica (0: they share the workers' cores).
        secure: generate a token, a CA and per-replica certificates (``serve.secure``).
        per_node: replicas on every node instead of the teacher's ``replicas`` (None).
        autoscale: grow and shrink the fleet with the students' label wait (None: fixed).
        cache: the label cache the replicas share and write through to (URL; None = none).
        cache_hidden: a ``cache`` the replicas create stores the teacher's hidden states too
            (the student distils them: ``distill.loss: hint``).
    """

    config: ServerConfig = field(default_factory=ServerConfig)
    compute: ReplicaCompute = field(default_factory=ReplicaCompute)
    num_cpus: float = 0.0
    secure: bool = True
    per_node: int | None = None
    autoscale: AutoscaleSection | None = None
    cache: str | None = None
    cache_hidden: bool = False

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ConfigError(f"must be >= 0, got {self.num_cpus}", where="serve.cpus_per_replica")


def replica_plan(serve: ServeSection) -> ReplicaPlan:
    """How a student starts its replicas, from the ``serve`` section (no cache yet: the run's
    cache path is the trainer's to choose)."""
    return ReplicaPlan(
        config=replica_server_config(serve),
        compute=replica_compute(serve),
        num_cpus=serve.cpus_per_replica,
        secure=serve.secure,
        per_node=serve.replicas_per_node,
        autoscale=serve.autoscale,
    )


@dataclass
class StartedTeachers:
    """What :func:`started_replicas` yields.

    Attributes:
        teachers: every teacher, the started ones as ``stream`` teachers of their fleets.
        wait_meter: the named Ray actor the students report their label wait to (None: no
            autoscaling).
        counters: filled as the block ends: each replica's counters.
        timeline: filled as the block ends: the autoscaler's decisions.
    """

    teachers: tuple[TeacherSpec, ...]
    wait_meter: str | None = None
    counters: list[ReplicaCounters] = field(default_factory=list)
    timeline: list[ScaleDecision] = field(default_factory=list)


@contextlib.contextmanager
def started_replicas(
    teachers: Sequence[TeacherSpec],
    *,
    checkpoint: PathInput,
    dataset: PathInput,
    run_name: str,
    client: ClientOptions,
    plan: ReplicaPlan = ReplicaPlan(),
    storage: PathInput | None = None,
) -> Iterator[StartedTeachers]:
    """Start the ``replicas`` teachers as Ray actors for the block (Ray initialised).

    Each gets a fleet of servers of ``checkpoint`` named ``stkd-teacher-<run>-<random>-<i>``;
    they are killed when the block ends.

    Args:
        checkpoint: the teacher checkpoint the replicas serve (any ``resolve_checkpoint`` ref).
        dataset: the teacher's dataset (store path).
        run_name: names the actors.
        client: the students' client options; each started teacher gets them with its fleet's
            token and CA (a token given here is the fleet's token).
        plan: how the replicas are started.
    """
    import ray

    fleets: list[ReplicaFleet] = []
    scalers: list[Autoscaler] = []
    meter: Any = None
    started = StartedTeachers(())
    if plan.autoscale is not None and sum(t.kind == "replicas" for t in teachers) > 1:
        raise ConfigError(
            "serve.autoscale sizes the fleet of one started teacher; start one (ray:N) or "
            "drop serve.autoscale",
            where="serve.autoscale",
        )
    try:
        out = []
        for t in teachers:
            if t.kind != "replicas":
                out.append(t)
                continue
            prefix = f"stkd-teacher-{run_name}-{uuid.uuid4().hex[:8]}"
            security = FleetSecurity(client.token) if plan.secure else None
            config = plan.config
            if security is None and client.token:
                config = dataclasses.replace(config, token=client.token)
            spec = FleetSpec(
                # absolute: the actors run in another working directory
                checkpoint=url(resolve_checkpoint(checkpoint, "teacher", storage)),
                data=url(dataset),
                config=config,
                cache=plan.cache,
                write_through=plan.cache is not None,
                storage=None if storage is None else url(storage),
                compute=plan.compute,
                num_cpus=plan.num_cpus,
                cache_hidden=plan.cache_hidden,
            )
            fleet = ReplicaFleet(spec, prefix, security)
            fleets.append(fleet)
            policy = plan.autoscale
            n = t.replicas if policy is None else min(max(policy.min, t.replicas), policy.max)
            fleet.start(n, per_node=plan.per_node)
            out.append(TeacherSpec("stream", fleet.endpoint, client=fleet.client_options(client)))
            if policy is not None:
                if meter is None:
                    started.wait_meter = f"stkd-wait-{run_name}-{uuid.uuid4().hex[:8]}"
                    meter = ray.remote(WaitMeter).options(name=started.wait_meter).remote()
                scaler = Autoscaler(policy, fleet, _taker(meter))
                scaler.start()
                scalers.append(scaler)
        started.teachers = tuple(out)
        yield started
    finally:
        for scaler in scalers:
            scaler.stop()
            started.timeline += scaler.timeline
        for fleet in fleets:
            started.counters += fleet.counters()
            fleet.close()
        if meter is not None:
            with contextlib.suppress(Exception):
                ray.kill(meter)


def _taker(meter: Any) -> Any:
    import ray

    def take() -> tuple[float, float, int]:
        return ray.get(meter.take.remote(), timeout=30)

    return take
