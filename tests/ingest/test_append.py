"""``stkd ingest --append``: new steps added to a store in place, checked, and safe to kill.

The evidence is a store ingested in one go from the whole series: an appended store must hold
the same readings, mask and timestamps, and have the same fingerprint (computed from scratch
over the one-go store, from the blocks the append changed over the appended one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import stkd_dist.storage.append as append_module
from stkd_dist.errors import InputError, StoreError
from stkd_dist.info import dataset_info
from stkd_dist.ingest import IngestOptions, append, ingest
from stkd_dist.location import location
from stkd_dist.storage import open_store
from stkd_dist.storage.fingerprint import FINGERPRINT_BLOCK

STEPS, NODES, CHANNELS = 2600, 3, 2
CUT = 1500  # inside the second fingerprint block: the append re-hashes a partial block


def _series(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 100, size=(STEPS, NODES, CHANNELS)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0.0  # "no reading"
    return x


def _npy(path: Path, x: np.ndarray) -> Path:
    np.save(path, x)
    return path


def _ingest(tmp_path: Path, x: np.ndarray, name: str, start: str = "2016-07-01 00:00") -> Path:
    out = tmp_path / f"{name}.zarr"
    ingest(
        IngestOptions(
            source=_npy(tmp_path / f"{name}.npy", x),
            out=out,
            channels=("flow", "speed"),
            missing_value=0.0,
            start=start,
            chunk_steps=256,
        )
    )
    return out


def _append(tmp_path: Path, store: Path, x: np.ndarray, name: str, **kw: object) -> object:
    options = IngestOptions(
        source=_npy(tmp_path / f"{name}.npy", x),
        out=store,
        channels=kw.pop("channels", ("flow", "speed")),  # type: ignore[arg-type]
        missing_value=0.0,
        **kw,  # type: ignore[arg-type]
    )
    return append(options)


def _digest_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _same_content(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.shape == sb.shape
    va, ma = sa.read(0, sa.steps)
    vb, mb = sb.read(0, sb.steps)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(va, vb)
    assert (sa.time == sb.time).all()
    for key in ("missing", "missing_fraction", "nonfinite_count", "masked_missing_value_count"):
        assert sa.attrs[key] == sb.attrs[key], key


@pytest.fixture
def whole(tmp_path: Path) -> Path:
    return _ingest(tmp_path, _series(), "whole")


def test_appended_steps_equal_one_ingest_of_the_whole_series(tmp_path: Path, whole: Path) -> None:
    x = _series()
    store = _ingest(tmp_path, x[:CUT], "grown")
    first = open_store(store).fingerprint
    # no timestamps and no --start: the steps continue the store
    r = _append(tmp_path, store, x[CUT:2100], "day2")
    assert (r.steps_before, r.steps_added) == (CUT, 600)
    assert r.start == pd.Timestamp("2016-07-01") + CUT * pd.Timedelta("5min")
    second = open_store(store).fingerprint
    r = _append(tmp_path, store, x[2100:], "day3", start=str(r.end + pd.Timedelta("5min")))
    _same_content(store, whole)
    grown = open_store(store)
    # the fingerprint extended from the kept block digests is the one-go store's
    assert grown.fingerprint == open_store(whole).fingerprint == r.fingerprint
    assert [h["fingerprint"] for h in grown.attrs["fingerprint_history"]] == [first, second]
    assert [h["steps"] for h in grown.attrs["fingerprint_history"]] == [CUT, 2100]
    assert [s["name"] for s in grown.attrs["sources"]] == ["grown.npy", "day2.npy", "day3.npy"]
    assert STEPS // FINGERPRINT_BLOCK >= 2  # the blocks before the old end were kept
    info = dataset_info(grown)  # what `stkd info` shows
    assert info.steps == STEPS and [h["steps"] for h in info.fingerprint_history] == [CUT, 2100]
    # what users read with xarray: the whole time axis, NaN where not observed
    ds = xr.open_zarr(str(store))
    assert ds.sizes["time"] == STEPS and bool(ds["values"].isnull().equals(~ds["mask"]))


def test_nodes_and_channels_in_another_order_are_put_in_the_stores(
    tmp_path: Path, whole: Path
) -> None:
    x = _series()
    store = _ingest(tmp_path, x[:CUT], "grown")
    # the same readings with the channels swapped, named accordingly
    _append(tmp_path, store, x[CUT:, :, ::-1], "swapped", channels=("speed", "flow"))
    _same_content(store, whole)
    assert open_store(store).fingerprint == open_store(whole).fingerprint


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": "2016-07-06 04:50"}, r"2 step\(s\) overlap; append only steps after"),
        ({"start": "2016-07-06 05:10"}, r"a gap of 2 step\(s\) from 2016-07-06 05:00:00"),
        ({"freq": "10min"}, r"10min apart, the store's 5min"),
        ({"channels": ("flow", "occupancy")}, r"missing speed; not in the store: occupancy"),
        ({"nodes": 4}, r"node ids differ from the store's \(not in the store: 3\)"),
        ({"adjacency": "adj.csv"}, r"keeps the store's graph.*drop --adjacency"),
    ],
)
def test_steps_that_do_not_continue_the_store_are_refused_and_it_is_unchanged(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    x = _series()
    store = _ingest(tmp_path, x[:CUT], "grown")  # ends at 2016-07-06 04:55
    before = _digest_tree(store)
    new = x[CUT : CUT + 100]
    if "nodes" in change:
        new = np.concatenate([new, new[:, :1]], axis=1)
        change = {}
    if "adjacency" in change:
        (tmp_path / "adj.csv").write_text("1,0,0\n0,1,0\n0,0,1\n")
        change = {"adjacency": tmp_path / "adj.csv"}
    with pytest.raises(InputError, match=message) as e:
        _append(tmp_path, store, new, "bad", **change)
    assert e.value.where  # the option or the source file is named
    assert _digest_tree(store) == before


def test_a_killed_append_is_refused_by_readers_and_rolled_back_by_the_next(
    tmp_path: Path, whole: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _series()
    store = _ingest(tmp_path, x[:CUT], "grown")
    old = open_store(store).fingerprint

    # killed after the arrays grew, before the commit: no handler runs (as under SIGKILL)
    class Killed(BaseException):
        pass

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(append_module, "fingerprint_store", killed)
        mp.setattr(append_module, "rollback", lambda path: False)
        with pytest.raises(Killed):
            append_module.append_steps(
                location(store), *_dask(x[CUT:]), *_axes(x[CUT:]), "killed.npy"
            )
    assert xr.open_zarr(str(store), consolidated=False).sizes["time"] == STEPS  # half-appended
    with pytest.raises(StoreError, match="an append to this store was interrupted"):
        open_store(store)

    # the next append undoes it first, then appends
    r = _append(tmp_path, store, x[CUT:], "again")
    assert r.rolled_back and r.previous_fingerprint == old
    _same_content(store, whole)
    assert open_store(store).fingerprint == open_store(whole).fingerprint


def test_a_failed_write_rolls_the_store_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _series()
    store = _ingest(tmp_path, x[:CUT], "grown")
    before = open_store(store)
    values, mask = before.read(0, CUT)

    real, calls = append_module.fingerprint_store, []

    def outage(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == 1:  # the append's; the rollback's own works
            raise StoreError("storage unavailable after 5 attempts (503)", where=str(store))
        return real(*args, **kwargs)

    monkeypatch.setattr(append_module, "fingerprint_store", outage)
    with pytest.raises(StoreError, match="storage unavailable"):
        _append(tmp_path, store, x[CUT:], "day2")
    monkeypatch.undo()
    after = open_store(store)
    assert after.shape == before.shape and after.fingerprint == before.fingerprint
    v2, m2 = after.read(0, CUT)
    np.testing.assert_array_equal(m2, mask)
    np.testing.assert_array_equal(v2, values)
    assert "fingerprint_history" not in after.attrs


def _dask(x: np.ndarray) -> tuple[object, object]:
    import dask.array as da

    mask = x != 0
    return da.from_array(x), da.from_array(mask)


def _axes(x: np.ndarray) -> tuple[pd.DatetimeIndex, list[str], list[str], str]:
    start = pd.Timestamp("2016-07-01") + CUT * pd.Timedelta("5min")
    time = pd.date_range(start, periods=len(x), freq="5min")
    return time, [str(i) for i in range(NODES)], ["flow", "speed"], "5min"


@pytest.mark.integration
@pytest.mark.slow
def test_a_sigkilled_append_command_is_refused_then_rolled_back(tmp_path: Path) -> None:
    """A real ``stkd ingest --append`` SIGKILLed while it writes: readers refuse the store, and
    the same command again gives the store one ingest of the whole series gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(1)
    x = rng.uniform(1, 100, size=(40_000, 200, 1)).astype(np.float32)  # ~32 MiB appended
    head = 1000
    np.save(tmp_path / "head.npy", x[:head])
    np.save(tmp_path / "rest.npy", x[head:])
    np.save(tmp_path / "whole.npy", x)
    for name in ("head", "whole"):
        ingest(IngestOptions(source=tmp_path / f"{name}.npy", out=tmp_path / f"{name}.zarr"))
    store = tmp_path / "head.zarr"
    chunks = store / "values" / "c"
    before = sum(1 for _ in chunks.rglob("*") if _.is_file())
    command = [sys.executable, "-m", "stkd_dist.cli", "ingest", str(tmp_path / "rest.npy"),
               "--append", "--out", str(store)]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        # the observable event: the marker in the root metadata and new chunks on disk
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            marked = "stkd_append_in_progress" in (store / "zarr.json").read_text()
            if marked and sum(1 for _ in chunks.rglob("*") if _.is_file()) > before:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the append finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(StoreError, match="an append to this store was interrupted"):
        open_store(store)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "an interrupted earlier append was rolled back first" in again.stdout
    _same_content(store, tmp_path / "whole.zarr")
    assert open_store(store).fingerprint == open_store(tmp_path / "whole.zarr").fingerprint
