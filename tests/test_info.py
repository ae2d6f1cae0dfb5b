"""``stkd info`` and ``dataset_info``: checked against an independent computation."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

from stkd_dist.cli import main
from stkd_dist.info import channel_statistics, dataset_info
from stkd_dist.storage import StoreMeta, open_store, write_store
from stkd_dist.synth import SynthSpec, synthesize


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = SynthSpec(nodes=15, steps=1500, seed=6, channels=("flow", "speed"))
    return synthesize(spec, tmp_path_factory.mktemp("info") / "syn.zarr", chunk_steps=256)


def _independent(path):
    root = zarr.open_group(path, mode="r")
    values = np.asarray(root["values"][...], dtype=np.float64)
    mask = np.asarray(root["mask"][...])
    return values, mask


def test_json_fields_match_independent_computation(synthetic, capsys):
    assert main(["info", str(synthetic), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    values, mask = _independent(synthetic)
    steps, nodes, _ = values.shape
    assert (out["name"], out["steps"], out["nodes"]) == ("syn", steps, nodes)
    assert out["channels"] == ["flow", "speed"]
    assert out["chunks"] == [256, 15, 2]
    assert out["freq"] == "5min"
    assert out["start"] == "2024-01-01T00:00:00"
    expected_end = pd.Timestamp("2024-01-01") + (steps - 1) * pd.Timedelta("5min")
    assert pd.Timestamp(out["end"]) == expected_end
    assert out["missing_fraction"] == pytest.approx(1 - mask.mean())
    for c, name in enumerate(out["channels"]):
        observed = values[..., c][mask[..., c]]
        stats = out["channel_stats"][name]
        assert out["missing"][name]["count"] == int((~mask[..., c]).sum())
        assert out["missing"][name]["fraction"] == pytest.approx(1 - mask[..., c].mean())
        assert stats["count"] == observed.size
        assert stats["mean"] == pytest.approx(observed.mean(), rel=1e-9)
        assert stats["std"] == pytest.approx(observed.std(), rel=1e-9)
        assert stats["min"] == pytest.approx(observed.min())
        assert stats["max"] == pytest.approx(observed.max())
        train = values[:1050, :, c][mask[:1050, :, c]]  # default 70 % training split
        assert out["training_stats"]["mean"][name] == pytest.approx(train.mean(), rel=1e-5)
        assert out["training_stats"]["std"][name] == pytest.approx(train.std(), rel=1e-4)
    adj = np.asarray(zarr.open_group(synthetic, mode="r")["graph"]["adjacency"][...])
    edges = int(sum(adj[i, j] != 0 for i in range(nodes) for j in range(nodes) if i != j))
    assert out["graph"]["edges"] == edges
    assert out["graph"]["nodes"] == nodes
    assert out["graph"]["density"] == pytest.approx(edges / (nodes * (nodes - 1)))
    assert out["fingerprint"] == open_store(synthetic).fingerprint
    assert "synthetic" in out["provenance"]
    assert out["sources"] == []
    assert out["path"] == str(synthetic)
    assert out["has_locations"] is True
    assert out["attrs"]["synth"]["seed"] == 6


def test_human_output_shows_fingerprint_and_channels(synthetic, capsys):
    assert main(["info", str(synthetic)]) == 0
    out = capsys.readouterr().out
    store = open_store(synthetic)
    assert store.fingerprint in out
    assert "flow" in out and "speed" in out
    assert "1500 steps x 15 nodes x 2 channels" in out


def test_info_by_dataset_name(storage_root, capsys):
    synthesize(SynthSpec(nodes=4, steps=100), storage_root / "datasets" / "named.zarr")
    assert main(["info", "named", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 100


def test_missing_store_is_one_error_line(storage_root, capsys):
    assert main(["info", "no-such-dataset"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stkd: error: no-such-dataset:")
    assert "Traceback" not in captured.err and captured.out == ""


def test_all_missing_channel_and_no_graph(tmp_path):
    steps, nodes = 50, 3
    values = np.arange(steps * nodes * 2, dtype=np.float32).reshape(steps, nodes, 2)
    mask = np.ones_like(values, dtype=bool)
    mask[..., 1] = False
    meta = StoreMeta(
        name="holes",
        time=pd.date_range("2024-01-01", periods=steps, freq="1h"),
        node_ids=["a", "b", "c"],
        channels=["x", "empty"],
        freq="1h",
    )
    path = write_store(tmp_path / "h.zarr", da.from_array(values), da.from_array(mask), meta)
    store = open_store(path)
    stats = channel_statistics(store)
    assert stats["empty"].count == 0 and stats["empty"].missing == steps * nodes
    assert stats["empty"].mean is None and stats["empty"].max is None
    assert stats["x"].min == 0.0 and stats["x"].max == float(values[..., 0].max())
    info = dataset_info(store)
    assert info.graph.has_adjacency is False and info.graph.edges == 0
    assert info.missing_fraction == pytest.approx(0.5)
    json.dumps(info.to_json(), allow_nan=False)  # valid JSON: no NaN
