"""Ingest every real dataset in the shared data folder and check the stores against the files."""

from __future__ import annotations

import csv
import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stkd_dist.ingest import IngestOptions, ingest
from stkd_dist.storage import open_store


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_pickle(path: Path) -> tuple[list[str], dict[str, int], np.ndarray]:
    with path.open("rb") as f:
        ids, id_to_index, adj = pickle.load(f, encoding="latin1")
    return [str(i) for i in ids], {str(k): int(v) for k, v in id_to_index.items()}, adj


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ingest-real")


@pytest.fixture(scope="module")
def los(shared_data: Path, out_dir: Path):
    speed = shared_data / "los-loop" / "los_speed.csv"
    adj = shared_data / "los-loop" / "los_adj.csv"
    result = ingest(IngestOptions(source=speed, adjacency=adj, out=out_dir / "los.zarr"))
    return result, speed, adj


def test_los_loop_csv_with_dense_adjacency(los):
    result, speed, adj_path = los
    store = open_store(result.path)
    header = pd.read_csv(speed, nrows=0).columns.tolist()
    source = pd.read_csv(speed).to_numpy()  # [time, node]

    assert store.shape == (2016, 207, 1)
    assert store.channels == ["value"]
    assert store.node_ids == header
    assert store.freq == "5min"
    values, mask = store.read(0, store.steps)
    assert mask.all()  # Los-loop has no gaps
    np.testing.assert_array_equal(values[:, :, 0], source.astype(np.float32))

    adj = store.adjacency()
    expected = np.loadtxt(adj_path, delimiter=",")
    np.testing.assert_allclose(adj, expected.astype(np.float32))
    np.testing.assert_array_equal(adj, adj.T)
    assert ((adj >= 0) & (adj <= 1)).all()
    assert np.diag(adj).tolist() == [1.0] * 207

    sources = store.attrs["sources"]
    assert sources == [
        {"name": "los_speed.csv", "sha256": _sha256(speed)},
        {"name": "los_adj.csv", "sha256": _sha256(adj_path)},
    ]
    assert "los_speed.csv" in store.attrs["provenance"]


def test_los_loop_xarray_round_trip(los):
    result, speed, _ = los
    ds = xr.open_zarr(result.path)
    assert ds["values"].dims == ("time", "node", "channel")
    source = pd.read_csv(speed)
    observed = ds["mask"].values[:, :, 0]
    got = ds["values"].values[:, :, 0]
    want = source.to_numpy().astype(np.float32)
    np.testing.assert_array_equal(got[observed], want[observed])
    assert [str(n) for n in ds["node"].values] == list(source.columns)
    assert pd.Timestamp(ds["time"].values[0]) == pd.Timestamp("2000-01-01 00:00")


def test_fingerprint_stable_for_same_file_and_changes_with_data(
    los, shared_data: Path, out_dir: Path
):
    result, speed, adj = los
    again = ingest(IngestOptions(source=speed, adjacency=adj, out=out_dir / "los-again.zarr"))
    assert again.fingerprint == result.fingerprint

    changed = out_dir / "los_speed_changed.csv"
    frame = pd.read_csv(speed)
    frame.iloc[100, 5] += 1.0
    frame.to_csv(changed, index=False)
    other = ingest(IngestOptions(source=changed, adjacency=adj, out=out_dir / "los-changed.zarr"))
    assert other.fingerprint != result.fingerprint
    assert open_store(other.path).attrs["sources"][0]["sha256"] == _sha256(changed)


def test_los_loop_with_metr_la_pickle_and_locations(shared_data: Path, out_dir: Path):
    speed = shared_data / "los-loop" / "los_speed.csv"
    pkl = shared_data / "metr-la-graph" / "adj_mx.pkl"
    locs = shared_data / "metr-la-graph" / "graph_sensor_locations.csv"
    # reverse the sensor columns so that the pickle's order differs from the data's order
    frame = pd.read_csv(speed)
    permuted = out_dir / "los_reversed.csv"
    frame[frame.columns[::-1]].to_csv(permuted, index=False)

    result = ingest(
        IngestOptions(source=permuted, adjacency=pkl, locations=locs, out=out_dir / "lm.zarr")
    )
    store = open_store(result.path)
    ids = store.node_ids
    assert ids == list(frame.columns[::-1])

    _, id_to_index, pkl_adj = _load_pickle(pkl)
    adj = store.adjacency()
    # entries looked up by sensor id in the pickle, for a few pairs with and without an edge
    rows, cols = np.nonzero(pkl_adj)
    nonzero_pairs = [(int(r), int(c)) for r, c in zip(rows[::250], cols[::250], strict=True)]
    index_to_id = {v: k for k, v in id_to_index.items()}
    for r, c in [*nonzero_pairs, (0, 1), (5, 200)]:
        a, b = index_to_id[r], index_to_id[c]
        assert adj[ids.index(a), ids.index(b)] == pytest.approx(pkl_adj[r, c])
    assert any(pkl_adj[r, c] > 0 for r, c in nonzero_pairs)
    assert adj[0, 0] == pytest.approx(pkl_adj[id_to_index[ids[0]], id_to_index[ids[0]]])

    table = pd.read_csv(locs, dtype={"sensor_id": str}).set_index("sensor_id")
    got = store.locations()
    for i in (0, 17, 206):
        assert got[i, 0] == pytest.approx(table.loc[ids[i], "latitude"])
        assert got[i, 1] == pytest.approx(table.loc[ids[i], "longitude"])
    names = [s["name"] for s in store.attrs["sources"]]
    assert names == ["los_reversed.csv", "adj_mx.pkl", "graph_sensor_locations.csv"]
    assert store.attrs["sources"][1]["sha256"] == _sha256(pkl)


def _kernel_by_hand(distance_csv: Path, nodes: int) -> np.ndarray:
    # DCRNN's rule written out independently: a dict keeps the last distance of a repeated pair
    dist: dict[tuple[int, int], float] = {}
    with distance_csv.open() as f:
        for row in csv.DictReader(f):
            dist[(int(row["from"]), int(row["to"]))] = float(row["cost"])
    sigma = float(np.std(list(dist.values())))
    expected = np.zeros((nodes, nodes))
    for (i, j), d in dist.items():
        w = math.exp(-((d / sigma) ** 2))
        expected[i, j] = w if w >= 0.1 else 0.0
    np.fill_diagonal(expected, 1.0)
    return expected


def test_pems08_npy_with_distances(shared_data: Path, out_dir: Path):
    npy = shared_data / "pems08-prefix" / "PEMS08_prefix_first1282steps.npy"
    distance = shared_data / "pems08-prefix" / "distance.csv"
    result = ingest(
        IngestOptions(
            source=npy,
            adjacency=distance,
            channels=("flow", "occupancy", "speed"),
            missing_value=0.0,
            out=out_dir / "pems08.zarr",
        )
    )
    store = open_store(result.path)
    data = np.load(npy)
    assert store.shape == (1282, 170, 3)
    assert store.channels == ["flow", "occupancy", "speed"]
    assert store.node_ids == [str(i) for i in range(170)]

    values, mask = store.read(0, store.steps)
    np.testing.assert_array_equal(mask, (data != 0) & np.isfinite(data))
    np.testing.assert_array_equal(values[mask], data[mask].astype(np.float32))
    assert np.isnan(values[~mask]).all()
    assert store.attrs["masked_missing_value_count"] == int((data == 0).sum()) > 0
    assert store.attrs["nonfinite_count"] == 0
    assert result.missing_fraction == pytest.approx((data == 0).mean())

    np.testing.assert_allclose(store.adjacency(), _kernel_by_hand(distance, 170), atol=1e-6)
    assert store.attrs["sources"] == [
        {"name": npy.name, "sha256": _sha256(npy)},
        {"name": "distance.csv", "sha256": _sha256(distance)},
    ]

    ds = xr.open_zarr(result.path)
    assert list(ds["channel"].values) == ["flow", "occupancy", "speed"]
    np.testing.assert_array_equal(ds["mask"].values, mask)
