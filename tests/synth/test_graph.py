"""Random geometric road graphs: connected, about the requested degree, kernel weights."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from stkd_dist.synth.graph import (
    KERNEL_THRESHOLD,
    _bridge_components,
    component_labels,
    degree_radius,
    random_road_graph,
)


def _connected_bfs(adj: np.ndarray) -> bool:
    seen = {0}
    todo = deque([0])
    while todo:
        i = todo.popleft()
        for j in np.nonzero(adj[i])[0]:
            if int(j) not in seen:
                seen.add(int(j))
                todo.append(int(j))
    return len(seen) == adj.shape[0]


@pytest.mark.parametrize(("nodes", "seed"), [(2, 0), (7, 1), (60, 2), (300, 3), (300, 4)])
def test_graph_is_connected_symmetric_with_unit_diagonal(nodes, seed):
    g = random_road_graph(nodes, np.random.default_rng(seed))
    adj = g.adjacency
    assert adj.shape == (nodes, nodes) and adj.dtype == np.float32
    assert np.array_equal(adj, adj.T)
    assert np.all(np.diag(adj) == 1.0)
    assert _connected_bfs(adj)
    off = adj[~np.eye(nodes, dtype=bool)]
    assert np.all((off == 0) | ((off >= KERNEL_THRESHOLD - 1e-7) & (off <= 1)))


def test_mean_degree_near_target_and_weights_fall_with_distance():
    g = random_road_graph(800, np.random.default_rng(5), mean_degree=5.0)
    mean_degree = g.edges / g.nodes
    assert 4.0 <= mean_degree <= 7.0
    src, dst = np.nonzero(np.triu(g.adjacency, 1))
    dist = np.linalg.norm(g.xy[src] - g.xy[dst], axis=1)
    w = g.adjacency[src, dst]
    inside = dist <= g.radius
    order = np.argsort(dist[inside])
    assert np.all(np.diff(w[inside][order]) <= 1e-6)  # Gaussian kernel: non-increasing
    assert np.all(w[~inside] == pytest.approx(KERNEL_THRESHOLD))  # fallback edges
    assert (~inside).sum() < 0.2 * inside.sum()


def test_degree_radius_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n = 1000
    r = degree_radius(n, 6.0)
    xy = rng.random((n, 2))
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    empirical = ((d <= r).sum() - n) / n
    assert empirical == pytest.approx(6.0, rel=0.1)


def test_locations_are_in_a_small_box():
    g = random_road_graph(50, np.random.default_rng(1))
    loc = g.locations()
    assert loc.shape == (50, 2)
    assert np.all(np.abs(loc[:, 0] - 34.0) <= 0.1 + 1e-9)
    assert np.all(np.abs(loc[:, 1] + 118.3) <= 0.12 + 1e-9)
    # the map keeps the geometry: the westmost sensor has the smallest longitude
    assert np.argmin(loc[:, 1]) == np.argmin(g.xy[:, 0])


def test_neighbour_csr_is_the_row_normalised_adjacency():
    g = random_road_graph(40, np.random.default_rng(2))
    indptr, index, weight = g.neighbour_csr()
    dense = np.zeros((40, 40))
    for i in range(40):
        dense[i, index[indptr[i] : indptr[i + 1]]] = weight[indptr[i] : indptr[i + 1]]
    expected = g.adjacency.astype(np.float64)
    np.fill_diagonal(expected, 0)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dense, expected)


def test_component_labels_and_bridging_of_far_clusters():
    rng = np.random.default_rng(3)
    # three tight clusters far apart, each internally complete, no edges between them
    xy = np.concatenate([rng.random((5, 2)) * 0.01 + c for c in (0.0, 0.5, 0.9)])
    block = np.ones((5, 5), dtype=bool)
    connected = np.zeros((15, 15), dtype=bool)
    for k in range(3):
        connected[5 * k : 5 * k + 5, 5 * k : 5 * k + 5] = block
    labels = component_labels(connected)
    assert len(set(labels.tolist())) == 3
    assert set(labels[:5]) == {0} and set(labels[5:10]) == {5}
    before = connected.sum()
    _bridge_components(xy, connected)
    assert _connected_bfs(connected)
    assert connected.sum() == before + 4  # two bridges, both directions
    assert np.array_equal(connected, connected.T)
