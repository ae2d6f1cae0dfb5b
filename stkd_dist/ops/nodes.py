"""The nodes a running Ray cluster reports (through its dashboard's state API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stkd_dist.ops.jobs import address_env_cleared
from stkd_dist.ops.ray_auth import auth_headers


@dataclass(frozen=True)
class NodeInfo:
    """A node as the cluster sees it."""

    node_id: str
    node_ip: str
    state: str
    is_head: bool
    resources: dict[str, float]


def list_nodes(dashboard_url: str) -> list[NodeInfo]:
    """Every node the cluster at ``dashboard_url`` knows (alive and dead), head first."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    headers = {"Content-Type": "application/json", **auth_headers()}
    with address_env_cleared():
        client = StateApiClient(address=dashboard_url, headers=headers)
    rows = client.list(
        StateResource.NODES,
        options=ListApiOptions(detail=True, limit=10_000),
        raise_on_missing_output=False,
    )
    nodes = [
        NodeInfo(
            node_id=_field(row, "node_id"),
            node_ip=_field(row, "node_ip"),
            state=_field(row, "state"),
            is_head=bool(_field(row, "is_head_node")),
            resources=dict(_field(row, "resources_total") or {}),
        )
        for row in rows
    ]
    return sorted(nodes, key=lambda n: (not n.is_head, n.state != "ALIVE", n.node_id))


def _field(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, dict) else getattr(row, name, None)
