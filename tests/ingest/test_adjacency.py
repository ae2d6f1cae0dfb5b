"""Graph files: dense CSV, edge lists (Gaussian kernel) and DCRNN pickles, aligned by node id."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from stkd_dist.errors import InputError
from stkd_dist.ingest import gaussian_kernel_adjacency, load_adjacency, load_locations


def test_gaussian_kernel_rule():
    src, dst = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 1])
    dist = np.array([50.0, 10.0, 400.0, 20.0])  # (0, 1) repeated: the last distance wins
    w = gaussian_kernel_adjacency(src, dst, dist, 3)
    sigma = np.std([20.0, 10.0, 400.0])
    assert w[0, 1] == pytest.approx(np.exp(-((20 / sigma) ** 2)), rel=1e-6)
    assert w[1, 2] == pytest.approx(np.exp(-((10 / sigma) ** 2)), rel=1e-6)
    assert w[2, 0] == 0.0  # exp(-(400/sigma)^2) < 0.1 is dropped
    assert w[1, 0] == 0.0  # not listed
    assert np.diag(w).tolist() == [1.0, 1.0, 1.0]
    assert w.dtype == np.float32


def test_gaussian_kernel_needs_spread_of_distances():
    with pytest.raises(InputError, match="std"):
        gaussian_kernel_adjacency(np.array([0]), np.array([1]), np.array([5.0]), 2)


def test_dense_csv_is_taken_as_is(tmp_path: Path):
    path = tmp_path / "adj.csv"
    path.write_text("1,0.5,0\n0.5,1,0.25\n0,0.25,1\n")
    adj = load_adjacency(path, ["a", "b", "c"])
    assert adj.kind == "dense-csv"
    np.testing.assert_allclose(adj.matrix, [[1, 0.5, 0], [0.5, 1, 0.25], [0, 0.25, 1]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,0\n0,x\n", "not a numeric NxN matrix"),
        ("1,0,0\n0,1\n0,0,1\n", "not a numeric NxN matrix"),
        ("1,-1\n0,1\n", "finite and >= 0"),
        ("a,b,weight\n0,1,3\n", "needs the columns from,to,cost"),
        ("from,to,cost\n0,1,far\n", "line 2: cost 'far'"),
        ("from,to,cost\n7,8,1\n8,9,2\n", "none of the 2 edges"),
    ],
)
def test_bad_graph_files(tmp_path: Path, text: str, message: str):
    path = tmp_path / "graph.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        load_adjacency(path, ["0", "1"])
    assert info.value.where == str(path)


def test_dcrnn_pickle_is_reordered_by_id(tmp_path: Path):
    ids = ["10", "20", "30", "40"]
    adj = np.arange(16, dtype=np.float32).reshape(4, 4)
    path = tmp_path / "adj_mx.pkl"
    with path.open("wb") as f:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, adj], f, protocol=2)
    got = load_adjacency(path, ["30", "10", "40"]).matrix  # a subset, in another order
    for i, a in enumerate(["30", "10", "40"]):
        for j, b in enumerate(["30", "10", "40"]):
            assert got[i, j] == adj[ids.index(a), ids.index(b)]
    with pytest.raises(InputError, match=r"2 of the data's 3 node ids .*'50', '60'"):
        load_adjacency(path, ["10", "50", "60"])


def test_not_a_dcrnn_pickle(tmp_path: Path):
    path = tmp_path / "adj.pkl"
    path.write_bytes(pickle.dumps({"adj": np.eye(2)}))
    with pytest.raises(InputError, match="expected a DCRNN adjacency pickle"):
        load_adjacency(path, ["0", "1"])


def test_locations_matched_by_id(tmp_path: Path):
    path = tmp_path / "loc.csv"
    path.write_text("index,sensor_id,latitude,longitude\n0,7,34.0,-118.0\n1,9,35.5,-117.5\n")
    np.testing.assert_allclose(load_locations(path, ["9", "7"]), [[35.5, -117.5], [34.0, -118.0]])
    bad = tmp_path / "bad.csv"
    bad.write_text("sensor_id,latitude,longitude\n7,134.0,-118.0\n")
    with pytest.raises(InputError, match="latitude in"):
        load_locations(bad, ["7"])
