"""Bad input through the CLI: one ``stkd: error:`` line naming the file, exit 2, nothing written."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stkd_dist.cli import main


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _good_csv(tmp: Path) -> Path:
    return _csv(tmp / "speed.csv", "s1,s2,s3\n1,2,3\n4,5,6\n7,8,9\n")


# Each case writes its inputs into the folder it is given and returns
# (arguments after `stkd ingest`, the file the error must name, text the message must contain).
Case = Callable[[Path], tuple[list[str], Path, str]]


def _missing_file(tmp: Path):
    return [str(tmp / "nope.csv")], tmp / "nope.csv", "no such file"


def _missing_adjacency(tmp: Path):
    src = _good_csv(tmp)
    return [str(src), "--adjacency", str(tmp / "adj.csv")], tmp / "adj.csv", "no such file"


def _unknown_format(tmp: Path):
    path = tmp / "blob.bin"
    path.write_bytes(bytes(range(256)))
    return [str(path)], path, "unknown format"


def _ambiguous_format(tmp: Path):
    path = tmp / "data.csv"
    np.save(tmp / "arr.npy", np.zeros((3, 2)))
    (tmp / "arr.npy").rename(path)
    return [str(path)], path, "ambiguous format"


def _ragged(tmp: Path):
    path = _csv(tmp / "ragged.csv", "s1,s2,s3\n1,2,3\n4,5,6\n7,8\n1,2,3\n")
    return [str(path)], path, "line 4 has 2 fields but the header has 3"


def _ragged_long(tmp: Path):
    path = _csv(tmp / "ragged.csv", "s1,s2\n1,2\n4,5,6\n")
    return [str(path)], path, "line 3 has 3 fields"


def _non_numeric(tmp: Path):
    path = _csv(tmp / "text.csv", "s1,s2,s3\n1,2,3\n4,fast,6\n7,8,9\n")
    return [str(path)], path, "line 3, column 's2': 'fast' is not a number"


def _adjacency_size(tmp: Path):
    src = _good_csv(tmp)
    adj = _csv(tmp / "adj.csv", "1,0\n0,1\n")
    return [str(src), "--adjacency", str(adj)], adj, "adjacency is 2x2 but the data has 3 nodes"


def _adjacency_not_square(tmp: Path):
    src = _good_csv(tmp)
    adj = _csv(tmp / "adj.csv", "1,0,0\n0,1,0\n")
    return [str(src), "--adjacency", str(adj)], adj, "it must be square"


def _pickle_missing_ids(tmp: Path):
    src = _good_csv(tmp)
    pkl = tmp / "adj_mx.pkl"
    with pkl.open("wb") as f:
        pickle.dump([["s1", "s2", "x"], {"s1": 0, "s2": 1, "x": 2}, np.eye(3)], f)
    return [str(src), "--adjacency", str(pkl)], pkl, "not in the pickle: 's3'"


def _locations_missing(tmp: Path):
    src = _good_csv(tmp)
    loc = _csv(
        tmp / "loc.csv", "index,sensor_id,latitude,longitude\n0,s1,34.1,-118.3\n1,s2,34,-118\n"
    )
    return [str(src), "--locations", str(loc)], loc, "no location for 1 of 3 nodes: 's3'"


def _too_short(tmp: Path):
    path = _csv(tmp / "short.csv", "s1,s2\n1,2\n")
    return [str(path)], path, "at least 2 are needed"


def _channels_mismatch(tmp: Path):
    path = tmp / "pems.npy"
    np.save(path, np.ones((5, 2, 3)))
    return [str(path), "--channels", "flow,speed"], Path("--channels"), "for 3 channel(s)"


def _npz_key_missing(tmp: Path):
    path = tmp / "pems.npz"
    np.savez(path, a=np.ones((5, 2)), b=np.ones((5, 2)))
    return [str(path), "--npz-key", "data"], path, "--npz-key 'data' is not in the archive"


def _npz_key_ambiguous(tmp: Path):
    path = tmp / "pems.npz"
    np.savez(path, a=np.ones((5, 2)), b=np.ones((5, 2)))
    return [str(path)], path, "choose one with --npz-key"


def _hdf_without_datetime_index(tmp: Path):
    path = tmp / "frame.h5"
    pd.DataFrame({"s1": [1.0, 2.0, 3.0], "s2": [4.0, 5.0, 6.0]}).to_hdf(path, key="df")
    return [str(path)], path, "not a DatetimeIndex"


def _duplicate_ids(tmp: Path):
    path = _csv(tmp / "dupes.csv", "s1,s2,s1\n1,2,3\n4,5,6\n")
    return [str(path)], path, "duplicate sensor ids in the header: 's1'"


CASES: dict[str, Case] = {
    "missing-file": _missing_file,
    "missing-adjacency": _missing_adjacency,
    "unknown-format": _unknown_format,
    "ambiguous-format": _ambiguous_format,
    "ragged-short-row": _ragged,
    "ragged-long-row": _ragged_long,
    "non-numeric-cell": _non_numeric,
    "adjacency-size": _adjacency_size,
    "adjacency-not-square": _adjacency_not_square,
    "pickle-missing-ids": _pickle_missing_ids,
    "locations-missing": _locations_missing,
    "too-short": _too_short,
    "channels-mismatch": _channels_mismatch,
    "npz-key-missing": _npz_key_missing,
    "npz-key-ambiguous": _npz_key_ambiguous,
    "hdf-without-datetime-index": _hdf_without_datetime_index,
    "duplicate-ids": _duplicate_ids,
}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stkd: error:")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing(
    case: str, tmp_path: Path, storage_root: Path, capsys: pytest.CaptureFixture[str]
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, named, text = CASES[case](inputs)
    capsys.readouterr()

    code = main(["ingest", *args, "--name", "bad"])

    err = capsys.readouterr().err
    assert code == 2
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert str(named) in lines[0]
    assert text in lines[0]
    assert "Traceback" not in err
    datasets = storage_root / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []


def test_existing_destination_needs_overwrite(
    tmp_path: Path, storage_root: Path, capsys: pytest.CaptureFixture[str]
):
    src = _good_csv(tmp_path)
    assert main(["ingest", str(src), "--name", "speed"]) == 0
    dest = storage_root / "datasets" / "speed.zarr"
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    capsys.readouterr()

    changed = _csv(tmp_path / "changed.csv", "s1,s2,s3\n9,9,9\n9,9,9\n")
    assert main(["ingest", str(changed), "--name", "speed"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(dest) in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before

    assert main(["ingest", str(changed), "--name", "speed", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert str(dest) in out and "2 steps x 3 nodes" in out
    assert [p.name for p in dest.parent.iterdir()] == ["speed.zarr"]  # no temporary left


def test_out_path_summary_and_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = _good_csv(tmp_path)
    dest = tmp_path / "stores" / "mine.zarr"
    code = main(
        ["ingest", str(src), "--out", str(dest), "--provenance", "CC-BY 4.0, test loop data"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "'mine'" in out and "fingerprint" in out and "3 steps x 3 nodes" in out

    from stkd_dist.storage import open_store

    store = open_store(dest)
    assert store.name == "mine"
    assert store.attrs["provenance"] == "CC-BY 4.0, test loop data"


@pytest.mark.integration
def test_console_script_exit_code_without_traceback(tmp_path: Path):
    ragged = _csv(tmp_path / "ragged.csv", "a,b\n1,2\n3\n")
    env = {**os.environ, "STKD_STORAGE": str(tmp_path / "storage")}
    # the installed console script when there is one, else the same entry point via -m
    script = Path(sys.executable).with_name("stkd")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stkd_dist.cli"]
    proc = subprocess.run(
        [*command, "ingest", str(ragged), "--name", "r"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "line 3 has 1 fields" in lines[0] and str(ragged) in lines[0]
    assert not (tmp_path / "storage" / "datasets" / "r.zarr").exists()


def test_global_storage_option_places_named_dataset(
    tmp_path: Path, storage_root: Path, capsys: pytest.CaptureFixture[str]
):
    # storage_root's monkeypatch restores STKD_STORAGE, which `--storage` overrides in-process
    src = _good_csv(tmp_path)
    other = tmp_path / "elsewhere"
    assert main(["--storage", str(other), "ingest", str(src), "--name", "speed"]) == 0
    assert (other / "datasets" / "speed.zarr").is_dir()
    assert not (storage_root / "datasets").exists()
