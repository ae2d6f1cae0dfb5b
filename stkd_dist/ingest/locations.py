"""Sensor locations: a CSV with ``sensor_id,latitude,longitude`` (METR-LA style, extra columns ok).

Rows are matched to the data's nodes by sensor id; every node must have a location.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import check_unique, format_missing, require_file

LOCATION_COLUMNS = ("sensor_id", "latitude", "longitude")


def load_locations(path: Path, node_ids: list[str]) -> np.ndarray:
    """``[node, 2]`` latitude/longitude of ``node_ids`` from a locations CSV."""
    require_file(path, "--locations")
    where = str(path)
    try:
        df = pd.read_csv(path, dtype={"sensor_id": str}, encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"malformed locations CSV: {e}", where=where) from e
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing_cols = [c for c in LOCATION_COLUMNS if c not in df.columns]
    if missing_cols:
        raise InputError(
            f"needs the columns {','.join(LOCATION_COLUMNS)}; missing {','.join(missing_cols)}",
            where=where,
        )
    ids = [str(s).strip() for s in df["sensor_id"]]
    check_unique(ids, where, "sensor ids")
    coords = df[["latitude", "longitude"]].apply(pd.to_numeric, errors="coerce").to_numpy()
    lat, lon = coords[:, 0], coords[:, 1]
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"line {r + 2}: sensor {ids[r]!r} needs a latitude in [-90, 90] and a longitude in "
            "[-180, 180]",
            where=where,
        )
    row = {sid: i for i, sid in enumerate(ids)}
    missing = [n for n in node_ids if n not in row]
    if missing:
        raise InputError(
            f"no location for {len(missing)} of {len(node_ids)} nodes: {format_missing(missing)}",
            where=where,
        )
    return coords[[row[n] for n in node_ids]].astype(np.float64)  # [node, 2]
