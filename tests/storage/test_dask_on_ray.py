"""Whole-dataset Dask computations run on Ray's Dask scheduler when Ray is connected."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from stkd_dist.compute import compute, scheduler_name
from stkd_dist.data.stats import compute_stats
from stkd_dist.storage import open_store
from stkd_dist.storage.fingerprint import fingerprint_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_same_results_on_ray_and_threads(make_store, ray_local, monkeypatch):
    store = open_store(make_store(steps=300, chunk_steps=50))
    assert scheduler_name() == "ray"  # auto: Ray is connected in this process
    on_ray = compute_stats(store, (0, 210))
    fp_ray = fingerprint_store(store.path)["fingerprint"]
    total_ray = compute(da.nansum(store.dask("values")))[0]

    monkeypatch.setenv("STKD_DASK", "threads")
    assert scheduler_name() == "threads"
    on_threads = compute_stats(store, (0, 210))
    assert np.array_equal(on_ray.mean, on_threads.mean)
    assert np.array_equal(on_ray.node_std, on_threads.node_std)
    assert fingerprint_store(store.path)["fingerprint"] == fp_ray == store.fingerprint
    assert compute(da.nansum(store.dask("values")))[0] == pytest.approx(total_ray)
