"""Random geometric road graphs.

Sensors are placed uniformly in the unit square. Two sensors are joined when they are closer than a
radius chosen so that the expected degree is the requested mean degree; every sensor is also joined
to its ``knn`` nearest sensors, and remaining components are bridged by their shortest gap, so the
graph is always connected. Edge weights follow the thresholded Gaussian kernel of distances used
for the public road-sensor graphs: ``w = exp(-(d / sigma)^2)`` with ``sigma`` set so that the kernel
equals the threshold at the radius; fallback edges get the threshold weight. The diagonal is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Centre and size (degrees) of the box the unit square is mapped to (about 22 km x 22 km).
CENTRE_LAT, CENTRE_LON = 34.0, -118.3
SPAN_LAT, SPAN_LON = 0.2, 0.24
KERNEL_THRESHOLD = 0.1
# Distances are computed in row blocks of about this many entries, so that memory stays bounded.
_BLOCK_ENTRIES = 2**20


@dataclass(frozen=True)
class RoadGraph:
    """A connected, undirected, weighted sensor graph.

    Attributes:
        xy: ``[node, 2]`` positions in the unit square.
        adjacency: ``[node, node]`` float32 symmetric weights, 1 on the diagonal, 0 for no edge.
        radius: the connection radius in unit-square units.
    """

    xy: np.ndarray
    adjacency: np.ndarray
    radius: float

    @property
    def nodes(self) -> int:
        return int(self.xy.shape[0])

    @property
    def edges(self) -> int:
        """Number of directed edges (nonzero off-diagonal entries)."""
        return int(np.count_nonzero(self.adjacency) - np.count_nonzero(np.diag(self.adjacency)))

    def locations(self) -> np.ndarray:
        """``[node, 2]`` latitude, longitude of each sensor."""
        lat = CENTRE_LAT + (self.xy[:, 1] - 0.5) * SPAN_LAT
        lon = CENTRE_LON + (self.xy[:, 0] - 0.5) * SPAN_LON
        return np.stack([lat, lon], axis=1)

    def neighbour_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neighbour lists with row-normalised weights, self excluded, in CSR form.

        Returns ``(indptr [node + 1], index [edge], weight [edge])``: the neighbours of node ``i``
        are ``index[indptr[i]:indptr[i + 1]]`` and their weights sum to 1, so
        ``np.add.reduceat(x[..., index] * weight, indptr[:-1], axis=-1)`` is the weighted mean of
        every node's neighbours (every node has one: the graph is connected).
        """
        adj = self.adjacency.astype(np.float64)
        np.fill_diagonal(adj, 0.0)
        src, dst = np.nonzero(adj)  # row-major: grouped by src
        indptr = np.zeros(self.nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=self.nodes), out=indptr[1:])
        weight = adj[src, dst] / adj.sum(axis=1)[src]
        return indptr, dst.astype(np.int64), weight


def degree_radius(nodes: int, mean_degree: float) -> float:
    """Radius at which ``nodes`` uniform points in the unit square have this expected degree.

    Uses the exact probability that two uniform points are closer than ``r`` (for ``r <= 1``):
    ``pi r^2 - 8/3 r^3 + r^4 / 2``, which accounts for the border.
    """
    target = min(mean_degree / max(nodes - 1, 1), 0.99)
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the probability is increasing in r on [0, 1]
        r = (lo + hi) / 2
        if math.pi * r**2 - 8 / 3 * r**3 + r**4 / 2 < target:
            lo = r
        else:
            hi = r
    return (lo + hi) / 2


def random_road_graph(
    nodes: int, rng: np.random.Generator, mean_degree: float = 5.0, knn: int = 2
) -> RoadGraph:
    """Build a connected random geometric graph of ``nodes`` sensors (see module docstring)."""
    if nodes < 2:
        raise ValueError(f"a road graph needs at least 2 nodes, got {nodes}")
    xy = rng.random((nodes, 2))
    radius = degree_radius(nodes, mean_degree)
    k = min(knn, nodes - 1)
    connected = np.zeros((nodes, nodes), dtype=bool)
    rows = max(1, _BLOCK_ENTRIES // nodes)
    for i0 in range(0, nodes, rows):
        i1 = min(nodes, i0 + rows)
        d = np.linalg.norm(xy[i0:i1, None, :] - xy[None, :, :], axis=-1)  # [rows, node]
        d[np.arange(i1 - i0), np.arange(i0, i1)] = np.inf  # no self in the k nearest
        connected[i0:i1] = d <= radius
        if k > 0:
            nearest = np.argpartition(d, k - 1, axis=1)[:, :k]  # [rows, k]
            connected[np.arange(i0, i1)[:, None], nearest] = True
    connected |= connected.T
    _bridge_components(xy, connected)

    sigma = radius / math.sqrt(math.log(1 / KERNEL_THRESHOLD))
    src, dst = np.nonzero(connected)
    dist = np.linalg.norm(xy[src] - xy[dst], axis=1)
    adjacency = np.zeros((nodes, nodes), dtype=np.float32)
    adjacency[src, dst] = np.maximum(np.exp(-((dist / sigma) ** 2)), KERNEL_THRESHOLD)
    np.fill_diagonal(adjacency, 1.0)
    return RoadGraph(xy=xy, adjacency=adjacency, radius=radius)


def component_labels(connected: np.ndarray) -> np.ndarray:
    """Connected-component label of every node (the smallest node index in its component)."""
    src, dst = np.nonzero(connected)
    labels = np.arange(connected.shape[0])
    while True:  # min-label propagation: converges in (graph diameter) rounds
        new = labels.copy()
        np.minimum.at(new, src, labels[dst])
        if np.array_equal(new, labels):
            return labels
        labels = new


def _bridge_components(xy: np.ndarray, connected: np.ndarray) -> None:
    """Join components by their shortest gaps until the graph is connected (in place)."""
    while True:
        labels = component_labels(connected)
        roots, sizes = np.unique(labels, return_counts=True)
        if roots.size == 1:
            return
        # bridge the smallest component to its nearest sensor outside it
        (inside,) = np.nonzero(labels == roots[np.argmin(sizes)])
        (outside,) = np.nonzero(labels != roots[np.argmin(sizes)])
        d = np.linalg.norm(xy[inside, None, :] - xy[None, outside, :], axis=-1)
        a, b = np.unravel_index(np.argmin(d), d.shape)
        connected[inside[a], outside[b]] = connected[outside[b], inside[a]] = True
