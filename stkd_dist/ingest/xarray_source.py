"""xarray / Zarr sources: a data variable with named dims ``time``, ``node`` (and ``channel``).

The dataset is opened lazily with ``xarray.open_zarr``; the variable is transposed to
``[time, node, channel]`` whatever order its dims are stored in, and stays a Dask array until the
store is written. Coordinates, when present, give the timestamps, node ids and channel names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import IngestOptions, IngestProgress, SourceData

REQUIRED_DIMS = ("time", "node")
OPTIONAL_DIMS = ("channel",)


def _open(path: Path) -> xr.Dataset:
    try:
        with warnings.catch_warnings():
            # a store without consolidated metadata is fine; xarray warns when falling back
            warnings.simplefilter("ignore", RuntimeWarning)
            return xr.open_zarr(path, consolidated=None)
    except Exception as e:  # zarr/xarray raise many types for a damaged or foreign store
        raise InputError(
            f"not a readable xarray Zarr dataset ({type(e).__name__}: {e})", str(path)
        ) from e


def _coord_strings(var: xr.DataArray, dim: str) -> list[str] | None:
    if dim not in var.coords:
        return None
    return [str(x).strip() for x in np.asarray(var.coords[dim].values).ravel()]


def read_zarr(path: Path, options: IngestOptions, progress: IngestProgress) -> SourceData:
    """Read a data variable of an xarray Zarr dataset."""
    where = str(path)
    progress.start(f"opening {path.name}")
    ds = _open(path)
    names = [str(v) for v in ds.data_vars]
    if options.variable is not None:
        if options.variable not in names:
            raise InputError(
                f"--variable {options.variable!r} is not in the dataset; it has: "
                f"{', '.join(names) or '(none)'}",
                where=where,
            )
        name = options.variable
    elif len(names) == 1:
        name = names[0]
    else:
        raise InputError(
            f"the dataset has {len(names)} data variables ({', '.join(names) or 'none'}): "
            "choose one with --variable",
            where=where,
        )
    var = ds[name]
    dims = tuple(str(d) for d in var.dims)
    unknown = [d for d in dims if d not in REQUIRED_DIMS + OPTIONAL_DIMS]
    if unknown or not all(d in dims for d in REQUIRED_DIMS):
        raise InputError(
            f"variable {name!r} has dims {dims}; it needs 'time' and 'node' and may have "
            "'channel', in any order (rename other dims first)",
            where=where,
        )
    if var.dtype.kind not in "iuf":
        raise InputError(f"variable {name!r} has dtype {var.dtype}; it must be numeric", where)
    if "channel" not in dims:
        var = var.expand_dims("channel", axis=-1)
    var = var.transpose("time", "node", "channel")  # [time, node, channel]

    time = None
    if "time" in var.coords and var.coords["time"].dtype.kind == "M":
        time = pd.DatetimeIndex(var.coords["time"].values)
    channels = _coord_strings(var, "channel") if "channel" in dims else None
    values = var.data if isinstance(var.data, da.Array) else da.from_array(var.data)
    return SourceData(
        values=values,
        node_ids=_coord_strings(var, "node"),
        time=time,
        channels=channels,
        has_channel_axis="channel" in dims,
        note=f"variable {name!r}",
    )
