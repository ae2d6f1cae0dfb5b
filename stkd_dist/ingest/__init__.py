"""Dataset ingestion: real formats → the canonical Zarr store.

Formats: wide CSV (Los-loop), NumPy ``.npy``/``.npz`` (PeMS), pandas HDF5 (METR-LA, PEMS-BAY) and
xarray Zarr datasets; graphs as a dense CSV, a ``from,to,cost`` edge list or a DCRNN
``adj_mx.pkl``. Use :func:`ingest` with :class:`IngestOptions`, or ``stkd ingest``.
"""

from stkd_dist.ingest.adjacency import Adjacency, gaussian_kernel_adjacency, load_adjacency
from stkd_dist.ingest.common import FORMATS, IngestOptions, IngestProgress, SourceData
from stkd_dist.ingest.detect import detect_format
from stkd_dist.ingest.locations import load_locations
from stkd_dist.ingest.pipeline import READERS, IngestResult, append, ingest

__all__ = [
    "FORMATS",
    "READERS",
    "Adjacency",
    "IngestOptions",
    "IngestProgress",
    "IngestResult",
    "SourceData",
    "append",
    "detect_format",
    "gaussian_kernel_adjacency",
    "ingest",
    "load_adjacency",
    "load_locations",
]
