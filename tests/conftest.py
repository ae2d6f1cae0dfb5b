"""Shared fixtures.

* ``shared_data``: the real datasets in ``../shared/data`` (tests using it skip when it is absent).
* ``storage_root``: a temporary storage root, also exported as ``STKD_STORAGE``.
* ``make_store``: writes a small random canonical store (real Zarr on disk).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from stkd_dist.storage import StoreMeta, write_store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STKD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real datasets; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not present ({SHARED_DATA} is absent)")
    return SHARED_DATA


@pytest.fixture
def storage_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh storage root for the test, exported as STKD_STORAGE."""
    root = tmp_path / "storage"
    root.mkdir()
    monkeypatch.setenv("STKD_STORAGE", str(root))
    return root


def random_store(
    path: Path,
    steps: int = 400,
    nodes: int = 6,
    channels: int = 2,
    chunk_steps: int = 64,
    missing: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a store of smooth random series with ``missing`` fraction masked."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None, None]
    base = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, size=(1, nodes, channels)))
    values = (base + rng.normal(0, 1, size=(steps, nodes, channels))).astype(np.float32)
    mask = rng.random((steps, nodes, channels)) >= missing
    adj = (rng.random((nodes, nodes)) < 0.4).astype(np.float32)
    np.fill_diagonal(adj, 1.0)
    meta = StoreMeta(
        name=path.stem,
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"n{i}" for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        adjacency=adj,
        provenance="random test data",
    )
    chunks = (chunk_steps, nodes, channels)
    return write_store(
        path,
        da.from_array(values, chunks=chunks),
        da.from_array(mask, chunks=chunks),
        meta,
        chunks=chunks,
    )


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_store(name="x", steps=..., nodes=..., channels=..., chunk_steps=...)``."""

    def make(name: str = "small", **kwargs: object) -> Path:
        return random_store(tmp_path / f"{name}.zarr", **kwargs)  # type: ignore[arg-type]

    return make
