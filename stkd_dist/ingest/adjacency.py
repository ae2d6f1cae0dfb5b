"""Graphs for ingest: a dense NxN CSV, a ``from,to,cost`` edge list, or a DCRNN ``adj_mx.pkl``.

* Dense CSV (Los-loop ``los_adj.csv``): headerless, one row and column per node in the data's
  node order; weights are taken as they are.
* Edge list (PeMS ``distance.csv``): header ``from,to,cost``; ``from``/``to`` are node ids and
  ``cost`` a distance, turned into weights by DCRNN's thresholded Gaussian kernel
  (:func:`gaussian_kernel_adjacency`).
* DCRNN pickle (METR-LA / PEMS-BAY ``adj_mx.pkl``): ``[sensor_ids, id_to_index, adj]``, reordered
  to the data's node order by sensor id. Unpickling runs code from the file: only ingest pickles
  from sources you trust.

The matrix is ``[node, node]`` float32 with row = from, column = to.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import format_missing, require_file

PICKLE_SUFFIXES = (".pkl", ".pickle")
EDGE_COLUMNS = ("from", "to", "cost")
# DCRNN's `normalized_k`: kernel weights below it are dropped for sparsity.
KERNEL_THRESHOLD = 0.1


@dataclass(frozen=True)
class Adjacency:
    """A graph aligned with the data's nodes.

    Attributes:
        matrix: ``[node, node]`` float32 weights, row = from.
        kind: ``"dense-csv"``, ``"edge-list"`` or ``"dcrnn-pickle"``.
        skipped_edges: edge-list rows naming a node that is not in the data (ignored, as in DCRNN).
    """

    matrix: np.ndarray
    kind: str
    skipped_edges: int = 0


def gaussian_kernel_adjacency(
    src: np.ndarray,
    dst: np.ndarray,
    dist: np.ndarray,
    nodes: int,
    threshold: float = KERNEL_THRESHOLD,
) -> np.ndarray:
    """DCRNN's ``get_adjacency_matrix``: ``w = exp(-(d / σ)²)``, ``w < threshold`` → 0.

    Distances start at +inf (no edge), listed edges fill them (a repeated pair keeps its last
    distance), σ is the standard deviation of the filled distances, and the diagonal is set to 1
    (a node's distance to itself is 0). Edges stay directed, as listed.

    Args:
        src, dst: ``[edge]`` node indices; dist: ``[edge]`` distances (>= 0).
        nodes: number of nodes.
    """
    d = np.full((nodes, nodes), np.inf, dtype=np.float64)
    d[src, dst] = dist
    sigma = float(d[np.isfinite(d)].std())
    if not sigma > 0:
        raise InputError("all edge distances are equal: the Gaussian kernel width (their std) is 0")
    w = np.exp(-np.square(d / sigma))
    w[w < threshold] = 0.0
    np.fill_diagonal(w, 1.0)
    return w.astype(np.float32)


def _check_matrix(adj: np.ndarray, nodes: int, where: str) -> np.ndarray:
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise InputError(
            f"adjacency is {'x'.join(map(str, adj.shape))}; it must be square "
            "(one row and one column per node)",
            where=where,
        )
    if adj.shape[0] != nodes:
        raise InputError(
            f"adjacency is {adj.shape[0]}x{adj.shape[1]} but the data has {nodes} nodes: "
            f"it must be {nodes}x{nodes}",
            where=where,
        )
    if not np.isfinite(adj).all() or (adj < 0).any():
        raise InputError("adjacency weights must be finite and >= 0", where=where)
    return adj.astype(np.float32)


def _first_line(path: Path) -> str:
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.strip()
    raise InputError("empty adjacency file", where=str(path))


def _is_numeric_row(line: str) -> bool:
    try:
        [float(x) for x in line.split(",")]
    except ValueError:
        return False
    return True


def _read_dense(path: Path, nodes: int) -> Adjacency:
    where = str(path)
    try:
        adj = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, encoding="utf-8-sig")
    except ValueError as e:  # names the row/column of a ragged row or a non-numeric cell
        raise InputError(f"not a numeric NxN matrix: {e}", where=where) from e
    return Adjacency(_check_matrix(adj, nodes, where), "dense-csv")


def _read_edges(path: Path, node_ids: list[str]) -> Adjacency:
    where = str(path)
    try:
        df = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=True)
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"malformed edge list: {e}", where=where) from e
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing_cols = [c for c in EDGE_COLUMNS if c not in df.columns]
    if missing_cols:
        raise InputError(
            f"edge list needs the columns {','.join(EDGE_COLUMNS)} (found "
            f"{','.join(df.columns)}); a dense adjacency must be a headerless NxN matrix",
            where=where,
        )
    if df.empty:
        raise InputError("edge list has no edges", where=where)
    cost = pd.to_numeric(df["cost"], errors="coerce")
    bad = cost.isna() | ~np.isfinite(cost) | (cost < 0)
    if bad.any():
        r = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"line {r + 2}: cost {df['cost'].iloc[r]!r} is not a finite distance >= 0", where=where
        )
    index = {n: i for i, n in enumerate(node_ids)}
    src = df["from"].str.strip().map(index)
    dst = df["to"].str.strip().map(index)
    known = (src.notna() & dst.notna()).to_numpy()
    if not known.any():
        raise InputError(
            f"none of the {len(df)} edges joins two nodes of the data (ids such as "
            f"{df['from'].iloc[0]!r}); from/to must be node ids (see --node-ids)",
            where=where,
        )
    try:
        matrix = gaussian_kernel_adjacency(
            src[known].to_numpy(dtype=np.int64),
            dst[known].to_numpy(dtype=np.int64),
            cost[known].to_numpy(dtype=np.float64),
            len(node_ids),
        )
    except InputError as e:
        raise InputError(e.message, where=where) from e
    return Adjacency(matrix, "edge-list", skipped_edges=int((~known).sum()))


def _read_pickle(path: Path, node_ids: list[str]) -> Adjacency:
    where = str(path)
    try:
        with path.open("rb") as f:
            # DCRNN's pickles were written by Python 2: latin1 decodes their byte strings
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # unpickling raises many types for a foreign or damaged file
        raise InputError(f"not a readable pickle ({type(e).__name__}: {e})", where=where) from e
    shape_ok = isinstance(obj, list | tuple) and len(obj) == 3 and isinstance(obj[1], dict)
    if not shape_ok:
        raise InputError(
            "expected a DCRNN adjacency pickle [sensor_ids, id_to_index, adj_mx]", where=where
        )
    adj = np.asarray(obj[2], dtype=np.float64)
    id_to_index = {str(k).strip(): int(v) for k, v in obj[1].items()}
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise InputError(f"adj_mx is {adj.shape}; it must be square", where=where)
    if any(not 0 <= i < adj.shape[0] for i in id_to_index.values()):
        raise InputError("id_to_index points outside adj_mx", where=where)
    missing = [n for n in node_ids if n not in id_to_index]
    if missing:
        raise InputError(
            f"{len(missing)} of the data's {len(node_ids)} node ids are not in the pickle: "
            f"{format_missing(missing)}",
            where=where,
        )
    order = np.asarray([id_to_index[n] for n in node_ids])
    # reorder rows and columns together into the data's node order
    return Adjacency(_check_matrix(adj[np.ix_(order, order)], len(node_ids), where), "dcrnn-pickle")


def load_adjacency(path: Path, node_ids: list[str]) -> Adjacency:
    """Load a graph file and align it with ``node_ids`` (the data's nodes, in order)."""
    require_file(path, "--adjacency")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, node_ids)
    first = _first_line(path)
    if _is_numeric_row(first):
        return _read_dense(path, len(node_ids))
    return _read_edges(path, node_ids)
