"""Normalisation statistics, computed with Dask over the training split only.

Statistics are masked (only observed readings count) and come per channel and per (node, channel).
They are cached in the store's ``stats`` attribute keyed by the training step range, so every
worker, server and trial normalises with the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from stkd_dist.compute import compute
from stkd_dist.data.windows import SplitSpec
from stkd_dist.location import PathInput
from stkd_dist.storage.store import DatasetStore

_EPS = 1e-6


@dataclass(frozen=True)
class Stats:
    """Masked mean and standard deviation of the training split.

    Attributes:
        steps: the ``(start, end)`` step range they were computed over.
        mean, std: ``[channel]``.
        node_mean, node_std: ``[node, channel]``.
        count: ``[channel]`` number of observed readings.
    """

    steps: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    node_mean: np.ndarray
    node_std: np.ndarray
    count: np.ndarray

    def to_json(self) -> dict:
        return {
            "steps": list(self.steps),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "node_mean": self.node_mean.tolist(),
            "node_std": self.node_std.tolist(),
            "count": self.count.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Stats:
        return cls(
            steps=(int(d["steps"][0]), int(d["steps"][1])),
            mean=np.asarray(d["mean"], dtype=np.float32),
            std=np.asarray(d["std"], dtype=np.float32),
            node_mean=np.asarray(d["node_mean"], dtype=np.float32),
            node_std=np.asarray(d["node_std"], dtype=np.float32),
            count=np.asarray(d["count"], dtype=np.int64),
        )

    def scale(self, per_node: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` broadcastable to ``[..., node, channel]``."""
        if per_node:
            return self.node_mean, self.node_std
        return self.mean[None, :], self.std[None, :]


def _key(steps: tuple[int, int]) -> str:
    return f"{steps[0]}-{steps[1]}"


def compute_stats(store: DatasetStore, steps: tuple[int, int]) -> Stats:
    """Compute masked statistics over steps ``[start, end)`` with Dask (chunk by chunk)."""
    lo, hi = steps
    values = store.dask("values")[lo:hi]  # [t, node, channel]
    mask = store.dask("mask")[lo:hi]
    x = da.where(mask, values, 0.0).astype(np.float64)
    m = mask.astype(np.float64)
    n_nc, s_nc, ss_nc = compute(
        m.sum(axis=0), x.sum(axis=0), (x * x).sum(axis=0)
    )  # [node, channel]

    def moments(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        safe = np.maximum(n, 1.0)
        mean = s / safe
        var = np.maximum(ss / safe - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < _EPS, 1.0, std)  # constant or unobserved: do not scale
        return mean.astype(np.float32), std.astype(np.float32)

    mean, std = moments(n_nc.sum(0), s_nc.sum(0), ss_nc.sum(0))
    node_mean, node_std = moments(n_nc, s_nc, ss_nc)
    # a node never observed in training falls back to the channel statistics
    unseen = n_nc == 0
    node_mean = np.where(unseen, mean[None, :], node_mean)
    node_std = np.where(unseen, std[None, :], node_std)
    return Stats((lo, hi), mean, std, node_mean, node_std, n_nc.sum(0).astype(np.int64))


def load_stats(store: DatasetStore, splits: SplitSpec = SplitSpec()) -> Stats:
    """Statistics of the training split of ``splits``: from the store's cache, else computed.

    A freshly computed result is written back to the store when it is writable.
    """
    steps = splits.step_ranges(store.steps)["train"]
    cached = store.attrs.get("stats", {}).get(_key(steps))
    if cached is not None:
        return Stats.from_json(cached)
    stats = compute_stats(store, steps)
    try:
        writable = DatasetStore(store.path, mode="r+")
        all_stats = dict(writable.attrs.get("stats", {}))
        all_stats[_key(steps)] = stats.to_json()
        writable.set_attrs(stats=all_stats)
    except OSError:  # a read-only store still works, it just recomputes
        pass
    return stats


def compute_and_store_stats(path: PathInput, splits: SplitSpec = SplitSpec()) -> Stats:
    """Compute and cache the statistics of the default training split (called at ingest)."""
    return load_stats(DatasetStore(path, mode="r+"), splits)
