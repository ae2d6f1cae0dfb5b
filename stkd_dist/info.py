"""What is in a dataset store: shape, time axis, missing data, statistics, graph, provenance.

:func:`dataset_info` scans the observed readings once with Dask (chunk by chunk, on the configured
scheduler) for per-channel counts, mean, std, min and max, and adds the cached training-split
statistics and the store's metadata. :func:`render_info` lays the result out for a terminal.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table

from stkd_dist.compute import compute
from stkd_dist.data.stats import load_stats
from stkd_dist.data.windows import SplitSpec
from stkd_dist.storage.store import DatasetStore

# Root attributes shown in their own fields; any other attribute is listed under ``attrs``.
_KNOWN_ATTRS = {
    "stkd_schema_version",
    "name",
    "freq",
    "sources",
    "fingerprint",
    "fingerprint_history",
    "provenance",
    "missing",
    "missing_fraction",
    "stats",
}


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of the observed readings of one channel (None when it has none)."""

    count: int
    missing: int
    missing_fraction: float
    mean: float | None
    std: float | None
    min: float | None
    max: float | None


@dataclass(frozen=True)
class GraphInfo:
    """Size of the sensor graph; ``edges`` counts nonzero off-diagonal adjacency entries."""

    nodes: int
    edges: int
    density: float
    has_adjacency: bool
    symmetric: bool


@dataclass(frozen=True)
class DatasetInfo:
    """Everything ``stkd info`` reports about one store (``fingerprint_history``: the store's
    fingerprints before each ``stkd ingest --append``, oldest first)."""

    name: str
    path: str
    steps: int
    nodes: int
    channels: list[str]
    chunks: list[int]
    freq: str
    start: str
    end: str
    missing_fraction: float
    channel_stats: dict[str, ChannelStats]
    training_stats: dict[str, Any]
    graph: GraphInfo
    fingerprint: str
    fingerprint_history: list[dict[str, Any]]
    provenance: str
    sources: list[dict[str, str]]
    has_locations: bool
    attrs: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """One JSON-serialisable object (``stkd info --json``)."""
        d = asdict(self)
        d["missing"] = {
            c: {"count": s.missing, "fraction": s.missing_fraction}
            for c, s in self.channel_stats.items()
        }
        return d


def channel_statistics(store: DatasetStore) -> dict[str, ChannelStats]:
    """Per-channel count, missing, mean, std (population), min and max of observed readings."""
    values = store.dask("values")  # [time, node, channel] float32
    mask = store.dask("mask")
    x = da.where(mask, values, np.nan).astype(np.float64)
    axes = (0, 1)
    with warnings.catch_warnings():
        # an all-missing channel gives NaN with a warning; it is reported as None below
        warnings.simplefilter("ignore", RuntimeWarning)
        count, mean, std, lo, hi = compute(
            mask.sum(axis=axes),
            da.nanmean(x, axis=axes),
            da.nanstd(x, axis=axes),
            da.nanmin(x, axis=axes),
            da.nanmax(x, axis=axes),
        )
    total = store.steps * store.nodes
    out = {}
    for c, name in enumerate(store.channels):
        n = int(count[c])

        def num(a: np.ndarray, c: int = c, n: int = n) -> float | None:
            return float(a[c]) if n > 0 and np.isfinite(a[c]) else None

        out[name] = ChannelStats(
            count=n,
            missing=total - n,
            missing_fraction=(total - n) / total,
            mean=num(mean),
            std=num(std),
            min=num(lo),
            max=num(hi),
        )
    return out


def graph_info(store: DatasetStore) -> GraphInfo:
    """Nodes, edges (nonzero off-diagonal entries) and density of the store's graph."""
    n = store.nodes
    if not store.has_adjacency:
        return GraphInfo(n, 0, 0.0, has_adjacency=False, symmetric=True)
    adj = store.adjacency()
    off = adj.copy()
    np.fill_diagonal(off, 0.0)
    edges = int(np.count_nonzero(off))
    density = edges / (n * (n - 1)) if n > 1 else 0.0
    return GraphInfo(
        n, edges, density, has_adjacency=True, symmetric=bool(np.array_equal(adj, adj.T))
    )


def dataset_info(store: DatasetStore, splits: SplitSpec = SplitSpec()) -> DatasetInfo:
    """Describe ``store``; reads every chunk once (with Dask) for the channel statistics."""
    stats = channel_statistics(store)
    train = load_stats(store, splits)
    time = store.time
    total = store.steps * store.nodes * len(store.channels)
    attrs = store.attrs
    return DatasetInfo(
        name=store.name,
        path=str(store.path),
        steps=store.steps,
        nodes=store.nodes,
        channels=list(store.channels),
        chunks=list(store.chunks),
        freq=store.freq,
        start=time[0].isoformat(),
        end=time[-1].isoformat(),
        missing_fraction=sum(s.missing for s in stats.values()) / total,
        channel_stats=stats,
        training_stats={
            "steps": list(train.steps),
            "mean": dict(zip(store.channels, train.mean.tolist(), strict=True)),
            "std": dict(zip(store.channels, train.std.tolist(), strict=True)),
        },
        graph=graph_info(store),
        fingerprint=store.fingerprint,
        fingerprint_history=list(attrs.get("fingerprint_history", [])),
        provenance=str(attrs.get("provenance", "")),
        sources=list(attrs.get("sources", [])),
        has_locations=store.locations() is not None,
        attrs={k: v for k, v in attrs.items() if k not in _KNOWN_ATTRS},
    )


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def render_info(info: DatasetInfo) -> RenderableType:
    """A rich panel: overview table, then one row per channel."""
    over = Table.grid(padding=(0, 2))
    over.add_column(style="bold")
    over.add_column(overflow="fold")
    g = info.graph
    graph = (
        f"{g.nodes} nodes, {g.edges} edges, density {g.density:.4f}"
        + ("" if g.symmetric else ", directed")
        if g.has_adjacency
        else f"{g.nodes} nodes, no adjacency"
    )
    sources = ", ".join(f"{s['name']} (sha256 {s['sha256'][:12]})" for s in info.sources) or "-"
    rows = [
        ("path", info.path),
        ("shape", f"{info.steps} steps x {info.nodes} nodes x {len(info.channels)} channels"),
        ("chunks", " x ".join(str(c) for c in info.chunks)),
        ("time", f"{info.start} .. {info.end} every {info.freq}"),
        ("missing", f"{info.missing_fraction:.2%}"),
        ("graph", graph),
        ("locations", "yes" if info.has_locations else "no"),
        ("fingerprint", info.fingerprint),
        *(
            ("before append", f"{h['fingerprint']} ({h['steps']} steps, to {h['end']})")
            for h in reversed(info.fingerprint_history)  # newest first, under the current one
        ),
        ("provenance", info.provenance or "-"),
        ("sources", sources),
    ]
    for key, value in rows:
        over.add_row(key, value)

    lo, hi = info.training_stats["steps"]
    chans = Table(
        title=f"channels (train = statistics of steps {lo}..{hi})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        expand=False,
    )
    for col in ("channel", "missing", "mean", "std", "min", "max", "train\nmean", "train\nstd"):
        chans.add_column(col, justify="left" if col == "channel" else "right", no_wrap=True)
    for name, s in info.channel_stats.items():
        chans.add_row(
            name,
            f"{s.missing_fraction:.2%}",
            _num(s.mean),
            _num(s.std),
            _num(s.min),
            _num(s.max),
            _num(info.training_stats["mean"][name]),
            _num(info.training_stats["std"][name]),
        )
    return Panel(Group(over, chans), title=f"dataset {info.name}", expand=False)
