"""NumPy sources: ``.npy`` and ``.npz`` arrays shaped ``[time, node]`` or ``[time, node, channel]``.

A ``.npy`` is memory-mapped and read block by block: the Dask graph holds only
``(path, start, stop)`` per block, so no block is read before it is written, and the graph stays
small on any scheduler (a memmap inside the graph would be pickled whole for Ray workers). An
``.npz`` member cannot be memory-mapped; it is loaded once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import IngestOptions, IngestProgress, SourceData

# Steps per block when reading a memory-mapped .npy (~32 MiB of float64 per block at most).
BLOCK_BYTES = 32 * 2**20


def _check_array(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if len(shape) not in (2, 3):
        raise InputError(
            f"array has shape {shape}; expected [time, node] or [time, node, channel]",
            where=where,
        )
    if dtype.kind not in "iuf":
        raise InputError(f"array has dtype {dtype}; readings must be numeric", where=where)
    if min(shape) == 0:
        raise InputError(f"array of shape {shape} is empty", where=where)


def _as_3d(values: da.Array) -> da.Array:
    return values[:, :, None] if values.ndim == 2 else values  # [time, node, channel]


def _npy_block(path: str, start: int, stop: int) -> np.ndarray:
    # each task maps the file itself: nothing but the path travels with the graph
    return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop])


def read_npy(path: Path, options: IngestOptions, progress: IngestProgress) -> SourceData:
    """Read a ``.npy`` array lazily through a memory map."""
    where = str(path)
    progress.start(f"mapping {path.name}")
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"not a readable .npy array ({e})", where=where) from e
    _check_array(mm.shape, mm.dtype, where)
    shape, dtype = mm.shape, mm.dtype
    del mm
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    step = max(1, BLOCK_BYTES // row_bytes)
    blocks = [
        da.from_delayed(
            dask.delayed(_npy_block)(str(path), lo, min(lo + step, shape[0])),
            shape=(min(lo + step, shape[0]) - lo, *shape[1:]),
            dtype=dtype,
        )
        for lo in range(0, shape[0], step)
    ]
    return SourceData(
        values=_as_3d(da.concatenate(blocks, axis=0)),
        has_channel_axis=len(shape) == 3,
        note="npy array",
    )


def read_npz(path: Path, options: IngestOptions, progress: IngestProgress) -> SourceData:
    """Read one array of an ``.npz`` (``--npz-key``, else ``data``, else the only one)."""
    where = str(path)
    progress.start(f"loading {path.name}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"not a readable .npz archive ({e})", where=where) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError("is a single .npy array, not an .npz archive", where=where)
    with archive:
        keys = list(archive.files)
        if options.npz_key is not None:
            key = options.npz_key
            if key not in keys:
                raise InputError(
                    f"--npz-key {key!r} is not in the archive; it has: "
                    f"{', '.join(keys) or '(none)'}",
                    where=where,
                )
        elif "data" in keys:
            key = "data"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise InputError(
                f"the archive has {len(keys)} arrays ({', '.join(keys)}) and none is named "
                "'data': choose one with --npz-key",
                where=where,
            )
        try:
            array = archive[key]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise InputError(f"cannot read array {key!r} ({e})", where=where) from e
    _check_array(array.shape, array.dtype, f"{where}[{key}]")
    values = da.from_array(array, chunks=(max(1, BLOCK_BYTES // array[0].nbytes), *array.shape[1:]))
    return SourceData(
        values=_as_3d(values), has_channel_axis=array.ndim == 3, note=f"npz key {key!r}"
    )
