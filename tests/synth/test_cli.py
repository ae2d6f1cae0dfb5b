"""``stkd synth`` on the command line."""

from __future__ import annotations

import numpy as np

from stkd_dist.cli import main
from stkd_dist.storage import open_store


def test_synth_by_name_under_the_storage_root(storage_root, capsys):
    assert main(["synth", "--nodes", "12", "--steps", "900", "--name", "small", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    store = open_store("small")
    assert store.path == storage_root / "datasets" / "small.zarr"
    assert store.shape == (900, 12, 1)
    assert store.fingerprint in out
    assert "900 steps x 12 nodes x 1 channels" in out


def test_synth_to_a_path_with_options(tmp_path, capsys):
    dest = tmp_path / "out" / "s.zarr"
    argv = ["synth", "--nodes", "7", "--steps", "300", "--out", str(dest)]
    argv += [
        "--channels",
        "flow, speed,occupancy",
        "--freq",
        "15min",
        "--start",
        "2023-05-06 07:00",
    ]
    assert main([*argv, "--chunk-steps", "64"]) == 0
    store = open_store(dest)
    assert store.channels == ["flow", "speed", "occupancy"]
    assert store.chunks == (64, 7, 3)
    assert store.freq == "15min"
    assert str(store.time[0]) == "2023-05-06 07:00:00"
    values, mask = store.read(0, 300)
    assert np.array_equal(np.isnan(values), ~mask)


def test_same_seed_same_fingerprint_across_chunk_sizes(tmp_path, capsys):
    for name, chunk in (("a", "100"), ("b", "777")):
        argv = ["synth", "--nodes", "6", "--steps", "2500", "--seed", "9", "--chunk-steps", chunk]
        assert main([*argv, "--out", str(tmp_path / f"{name}.zarr")]) == 0
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    assert a.chunks != b.chunks
    assert a.fingerprint == b.fingerprint


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("stkd: error: ")
    return err[0]


def test_bad_options_give_one_error_line(storage_root, capsys):
    assert main(["synth", "--nodes", "1", "--steps", "10"]) == 2
    assert "--nodes: must be between 2" in _one_error_line(capsys)
    assert main(["synth", "--nodes", "5", "--steps", "10", "--channels", "flow,volume"]) == 2
    assert "--channels: unknown channel 'volume'" in _one_error_line(capsys)
    assert main(["synth", "--nodes", "5", "--steps", "10", "--name", "a/b"]) == 2
    _one_error_line(capsys)
    datasets = storage_root / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())  # nothing half-written


def test_existing_store_needs_overwrite(storage_root, capsys):
    argv = ["synth", "--nodes", "5", "--steps", "200", "--name", "x"]
    assert main(argv) == 0
    first = open_store("x").fingerprint
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert open_store("x").fingerprint == first
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert open_store("x").fingerprint != first
