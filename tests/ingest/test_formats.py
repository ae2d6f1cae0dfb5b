"""Each source format on small files written by pandas / NumPy / xarray in the test."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from stkd_dist.errors import InputError
from stkd_dist.ingest import IngestOptions, detect_format, ingest
from stkd_dist.storage import open_store


def _frame(steps: int = 40, sensors: tuple[str, ...] = ("400001", "400017", "400030")):
    rng = np.random.default_rng(3)
    index = pd.date_range("2012-03-01 00:00", periods=steps, freq="5min")
    data = rng.uniform(20, 70, size=(steps, len(sensors))).round(3)
    return pd.DataFrame(data, index=index, columns=list(sensors))


def _dcrnn_pickle(path: Path, ids: list[str], adj: np.ndarray) -> Path:
    with path.open("wb") as f:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, adj.astype(np.float32)], f, protocol=2)
    return path


def test_hdf5_frame_with_dcrnn_pickle(tmp_path: Path):
    frame = _frame()
    frame.iloc[3, 1] = 0.0  # "no reading" in METR-LA
    frame.iloc[7, 2] = np.nan
    h5 = tmp_path / "metr.h5"
    frame.to_hdf(h5, key="df")
    # the pickle lists the sensors in another order than the frame's columns
    ids = ["400030", "400001", "400017"]
    pkl_adj = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.6], [0.0, 0.7, 1.0]])
    pkl = _dcrnn_pickle(tmp_path / "adj_mx.pkl", ids, pkl_adj)

    result = ingest(
        IngestOptions(source=h5, adjacency=pkl, missing_value=0, out=tmp_path / "m.zarr")
    )
    store = open_store(result.path)
    assert result.format == "hdf5"
    assert store.shape == (40, 3, 1)
    assert store.node_ids == ["400001", "400017", "400030"]
    assert store.freq == "5min"
    assert store.time.equals(frame.index)
    values, mask = store.read(0, 40)
    assert not mask[3, 1, 0] and not mask[7, 2, 0]
    assert mask.sum() == 40 * 3 - 2
    np.testing.assert_allclose(values[mask][:5], frame.to_numpy()[mask[:, :, 0]][:5], rtol=1e-6)
    assert store.attrs["nonfinite_count"] == 1
    assert store.attrs["masked_missing_value_count"] == 1
    # adjacency by id: data order (400001, 400017, 400030) = pickle indices (1, 2, 0)
    order = [1, 2, 0]
    np.testing.assert_allclose(store.adjacency(), pkl_adj[np.ix_(order, order)])
    assert store.adjacency()[0, 1] == pytest.approx(0.6)  # 400001 -> 400017


def test_hdf5_key_choice(tmp_path: Path):
    h5 = tmp_path / "two.h5"
    _frame().to_hdf(h5, key="speed")
    _frame(sensors=("a", "b")).to_hdf(h5, key="flow")
    with pytest.raises(InputError, match="--hdf-key"):
        ingest(IngestOptions(source=h5, out=tmp_path / "x.zarr"))
    result = ingest(IngestOptions(source=h5, hdf_key="flow", out=tmp_path / "x.zarr"))
    assert open_store(result.path).node_ids == ["a", "b"]


def test_zarr_dataset_with_dims_in_another_order(tmp_path: Path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 4, 30))  # [channel, node, time]
    data[1, 2, 5] = np.inf
    time = pd.date_range("2020-01-01", periods=30, freq="15min")
    ds = xr.Dataset(
        {"traffic": (("channel", "node", "time"), data)},
        coords={
            "channel": np.array(["flow", "speed"], dtype=object),
            "node": np.array(["n1", "n2", "n3", "n4"], dtype=object),
            "time": time,
        },
    )
    src = tmp_path / "source.zarr"
    ds.to_zarr(src, zarr_format=3, consolidated=False)

    result = ingest(IngestOptions(source=src, out=tmp_path / "t.zarr"))
    store = open_store(result.path)
    assert result.format == "zarr"
    assert store.shape == (30, 4, 2)
    assert store.channels == ["flow", "speed"]
    assert store.node_ids == ["n1", "n2", "n3", "n4"]
    assert store.freq == "15min"
    assert store.time.equals(time)
    values, mask = store.read(0, 30)
    expected = data.transpose(2, 1, 0)  # [time, node, channel]
    assert not mask[5, 2, 1]
    np.testing.assert_allclose(values[mask], expected[mask].astype(np.float32))
    assert store.attrs["nonfinite_count"] == 1


def test_zarr_variable_choice_and_missing_channel_dim(tmp_path: Path):
    ds = xr.Dataset(
        {
            "speed": (("node", "time"), np.ones((3, 10))),
            "flow": (("node", "time"), np.full((3, 10), 2.0)),
        }
    )
    src = tmp_path / "two.zarr"
    ds.to_zarr(src, zarr_format=3, consolidated=False)
    with pytest.raises(InputError, match="--variable"):
        ingest(IngestOptions(source=src, out=tmp_path / "x.zarr"))
    result = ingest(
        IngestOptions(source=src, variable="flow", start="2021-05-01", out=tmp_path / "x.zarr")
    )
    store = open_store(result.path)
    assert store.shape == (10, 3, 1)
    assert store.channels == ["value"]
    assert store.node_ids == ["0", "1", "2"]  # no node coordinate
    assert store.time[0] == pd.Timestamp("2021-05-01")
    assert float(store.read(0, 1)[0].max()) == 2.0


def test_csv_with_timestamp_column_and_missing_cells(tmp_path: Path):
    path = tmp_path / "speeds.csv"
    path.write_text(
        "timestamp,s1,s2\n"
        "2019-06-01 00:00,10.5,\n"
        "2019-06-01 00:10,11.0,20\n"
        "2019-06-01 00:20,nan,21\n"
        "2019-06-01 00:30,12.5,inf\n"
    )
    result = ingest(IngestOptions(source=path, out=tmp_path / "c.zarr"))
    store = open_store(result.path)
    assert store.freq == "10min"
    assert store.time[0] == pd.Timestamp("2019-06-01 00:00")
    assert store.node_ids == ["s1", "s2"]
    _, mask = store.read(0, 4)
    assert mask[:, :, 0].tolist() == [[True, False], [True, True], [False, True], [True, False]]
    assert result.nonfinite_count == 3


def test_csv_without_time_uses_start_and_freq(tmp_path: Path):
    path = tmp_path / "plain.csv"
    path.write_text("a,b\n1,2\n3,4\n5,6\n")
    result = ingest(
        IngestOptions(source=path, start="2024-02-03 04:00", freq="h", out=tmp_path / "p.zarr")
    )
    store = open_store(result.path)
    assert list(store.time) == list(pd.date_range("2024-02-03 04:00", periods=3, freq="h"))
    assert store.freq == "h"


def test_irregular_timestamps_are_rejected(tmp_path: Path):
    path = tmp_path / "gappy.csv"
    path.write_text("time,a\n2019-01-01 00:00,1\n2019-01-01 00:05,2\n2019-01-01 00:15,3\n")
    with pytest.raises(InputError, match="not regular: step 2"):
        ingest(IngestOptions(source=path, out=tmp_path / "g.zarr"))


def test_npz_key_choice_and_node_ids_file(tmp_path: Path):
    arr = np.arange(60, dtype=np.float32).reshape(10, 3, 2)
    npz = tmp_path / "pems.npz"
    np.savez(npz, data=arr, other=np.zeros(3))
    ids = tmp_path / "ids.txt"
    ids.write_text("301\n302\n303\n")
    distances = tmp_path / "distance.csv"
    distances.write_text("from,to,cost\n301,302,100\n302,303,300\n999,301,5\n")
    result = ingest(
        IngestOptions(
            source=npz, node_ids=ids, adjacency=distances, chunk_steps=4, out=tmp_path / "n.zarr"
        )
    )
    store = open_store(result.path)
    assert store.node_ids == ["301", "302", "303"]
    assert store.channels == ["c0", "c1"]
    assert store.chunks[0] == 4
    np.testing.assert_array_equal(store.read(0, 10)[0], arr)
    assert result.skipped_edges == 1  # the edge from an unknown node 999
    sigma = np.std([100.0, 300.0])
    adj = store.adjacency()
    assert adj[0, 1] == pytest.approx(np.exp(-((100 / sigma) ** 2)))
    assert adj[1, 2] == 0.0  # exp(-(300/100)^2) < 0.1
    assert adj[1, 0] == 0.0  # edges stay directed
    np.testing.assert_array_equal(np.diag(adj), 1.0)

    with pytest.raises(InputError, match=r"shape \(3,\); expected \[time, node\]"):
        ingest(IngestOptions(source=npz, npz_key="other", out=tmp_path / "bad.zarr"))
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("a.csv", b"x,y\n1,2\n", "csv"),
        ("a.dat", b"x,y\n1,2\n", "csv"),
        ("single.csv", b"x\n1\n2\n", "csv"),
        ("a.npy", b"\x93NUMPY\x01\x00rest", "npy"),
        ("noext", b"\x89HDF\r\n\x1a\nrest", "hdf5"),
        ("a.npz", b"PK\x03\x04rest", "npz"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, content: bytes, fmt: str):
    path = tmp_path / name
    path.write_bytes(content)
    assert detect_format(path) == fmt


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", b"\x93NUMPY\x01\x00rest", "ambiguous format"),
        ("a.h5", b"x,y\n1,2\n", "ambiguous format"),
        ("a.bin", b"\x00\x01\x02\x03", "unknown format"),
        ("notes", b"just some words\n", "unknown format"),
    ],
)
def test_detect_format_errors(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        detect_format(path)
