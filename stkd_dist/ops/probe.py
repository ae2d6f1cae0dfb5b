"""Cluster probe: run one tiny Ray task pinned to every alive node and report where it ran.

Used by ``stkd cluster probe`` (typically as a job: ``stkd submit -- cluster probe --json``) to
check that every node takes work and to learn the node ids that placement checks compare with,
e.g. that DDP workers of a training run landed on different nodes.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from stkd_dist.errors import ConfigError


@dataclass(frozen=True)
class ProbeResult:
    """What the task pinned to one node saw.

    Attributes:
        node_id: the node the task was pinned to (hex).
        ran_on: ``ray.get_runtime_context().get_node_id()`` inside the task.
        hostname / pid: host and worker process that ran it.
        is_head: whether the node is the head.
        custom_resources: the node's resources other than CPU/GPU/memory/object store.
    """

    node_id: str
    ran_on: str
    hostname: str
    pid: int
    is_head: bool
    custom_resources: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


_STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def probe_nodes(address: str | None = None, timeout_s: float = 120.0) -> list[ProbeResult]:
    """Pin one zero-CPU task to every alive node of the cluster and collect the reports.

    Args:
        address: cluster (GCS) address ``host:6379``; default ``RAY_ADDRESS``, which Ray sets
            for job drivers. Refuses to start a private local Ray instead.
        timeout_s: how long to wait for all tasks.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            "no cluster to probe: give --address HOST:PORT (the GCS address) or run it as a job "
            "(`stkd submit -- cluster probe`)",
            where="--address",
        )
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:

        @ray.remote(num_cpus=0)
        def report() -> tuple[str, str, int]:
            return ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid()

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [
            report.options(
                # soft=False: fail rather than run elsewhere, so a report proves placement
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote()
            for n in nodes
        ]
        reports = ray.get(refs, timeout=timeout_s)
    finally:
        if connected_here:
            ray.shutdown()
    results = []
    for node, (ran_on, hostname, pid) in zip(nodes, reports, strict=True):
        resources = node.get("Resources", {})
        custom = {
            k: float(v)
            for k, v in resources.items()
            if k not in _STANDARD_RESOURCES and not k.startswith("node:")
        }
        results.append(
            ProbeResult(
                node_id=node["NodeID"],
                ran_on=ran_on,
                hostname=hostname,
                pid=pid,
                is_head="node:__internal_head__" in resources,
                custom_resources=custom,
            )
        )
    return sorted(results, key=lambda r: (not r.is_head, r.node_id))
