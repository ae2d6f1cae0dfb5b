"""pandas HDF5 sources (METR-LA / PEMS-BAY ``.h5``): a DatetimeIndex × sensor-column frame.

The frame is read with ``pandas.read_hdf``. The "fixed" format these datasets use cannot be read
in slices, so the frame is loaded once; its values become the Dask array without another copy
when all columns share one dtype.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import IngestOptions, IngestProgress, SourceData, check_unique

# Steps per Dask block of the loaded frame.
BLOCK_STEPS = 8192


def _choose_key(path: Path, requested: str | None) -> str:
    where = str(path)
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = list(store.keys())
    except Exception as e:  # PyTables raises several unrelated types for a non-HDF5 file
        raise InputError(f"not a readable pandas HDF5 file ({type(e).__name__}: {e})", where) from e
    if requested is not None:
        key = requested if requested.startswith("/") else f"/{requested}"
        if key not in keys:
            raise InputError(
                f"--hdf-key {requested!r} is not in the file; it has: {', '.join(keys) or '(none)'}",
                where=where,
            )
        return key
    if len(keys) != 1:
        raise InputError(
            f"the file has {len(keys)} keys ({', '.join(keys) or 'none'}): choose one with --hdf-key",
            where=where,
        )
    return keys[0]


def read_hdf5(path: Path, options: IngestOptions, progress: IngestProgress) -> SourceData:
    """Read a pandas HDF5 frame: index = timestamps, columns = sensor ids."""
    where = str(path)
    key = _choose_key(path, options.hdf_key)
    progress.start(f"loading {path.name} {key}")
    try:
        frame = pd.read_hdf(path, key=key)
    except Exception as e:  # as above: PyTables and pandas raise many types here
        raise InputError(f"cannot read key {key} ({type(e).__name__}: {e})", where=where) from e
    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"key {key} holds a {type(frame).__name__}, not a DataFrame", where=where)
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise InputError(
            f"the frame under {key} is indexed by {type(frame.index).__name__}, not a DatetimeIndex: "
            "its index must hold the timestamps (one row per time step)",
            where=where,
        )
    sensors = [str(c).strip() for c in frame.columns]
    check_unique(sensors, where, "sensor ids (columns)")
    for col, sensor in zip(frame.columns, sensors, strict=True):
        dtype = frame[col].dtype
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            raise InputError(
                f"column {sensor!r} has dtype {dtype}; readings must be numeric", where=where
            )
    time = frame.index
    if time.tz is not None:  # the store's time axis is naive UTC
        time = time.tz_convert("UTC").tz_localize(None)
    array = frame.to_numpy(dtype=np.float64)  # [time, node]
    values = da.from_array(array[:, :, None], chunks=(BLOCK_STEPS, array.shape[1], 1))
    return SourceData(values=values, node_ids=sensors, time=time, note=f"HDF5 key {key}")
