"""The canonical dataset store: one Zarr v3 group per dataset.

Layout (``xarray.open_zarr(path)`` reads the root as a Dataset with dims ``time``, ``node``,
``channel``)::

    NAME.zarr/
      values   float32 [time, node, channel]   NaN where not observed
      mask     bool    [time, node, channel]   True where observed
      time     datetime coordinate [time]      (CF-encoded by xarray)
      node     str [node]                      sensor ids from the source
      channel  str [channel]                   channel names
      latitude, longitude  float64 [node]      optional sensor locations
      graph/adjacency      float32 [node, node] dense weighted adjacency (row = from)
      graph/edge_src, graph/edge_dst int32 [edge], graph/edge_weight float32 [edge]

Root attributes: ``stkd_schema_version``, ``name``, ``freq``, ``sources`` (file names with sha256),
``fingerprint``, ``provenance``, ``missing`` (per channel), ``nonfinite_count``, ``stats``.
"""

from stkd_dist.storage.layout import SCHEMA_VERSION, choose_chunks
from stkd_dist.storage.store import DatasetStore, open_store
from stkd_dist.storage.writer import SourceFile, StoreMeta, write_store

__all__ = [
    "SCHEMA_VERSION",
    "DatasetStore",
    "SourceFile",
    "StoreMeta",
    "choose_chunks",
    "open_store",
    "write_store",
]
