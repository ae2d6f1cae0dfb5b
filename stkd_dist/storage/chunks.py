"""Reading store arrays: a chunk whose bytes cannot be decoded becomes one :class:`StoreError`.

A damaged chunk object surfaces deep inside zarr's codec pipeline as whatever its codec raises
(numcodecs' zstd and blosc raise ``RuntimeError``, a truncated chunk a ``ValueError`` from the bytes
codec, gzip a ``zlib.error``), with no word of the store or the chunk. Every read of a store array
(:meth:`DatasetStore.read`, the Dask arrays of :mod:`stkd_dist.storage.lazy` that the statistics and
``stkd info`` compute, the coordinates) goes through :func:`read_array` or :func:`chunk_errors`:
on an error that is neither transient nor a storage error (a missing bucket, denied access), the
chunks the read covers are decoded one by one, and the first that fails alone is named in a
:class:`StoreError`: the store, the array, the chunk's index and key, and the rule ("re-ingest the
dataset"). An error no single chunk reproduces is not corruption and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import zarr

from stkd_dist.errors import StoreError
from stkd_dist.location import is_transient, retrying, storage_error, storage_errors

REINGEST = "re-ingest the dataset"
#: the modes :func:`zarr.open_group` takes
ZarrMode = Literal["r", "r+", "a", "w", "w-"]


def member_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    """The array ``name`` of ``group``; a group of that name is a damaged store."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} must be an array, found a group", where=where)
    return node


def member_group(group: zarr.Group, name: str, where: str) -> zarr.Group | None:
    """The sub-group ``name`` of ``group``, or None when it has none."""
    node = group.get(name)
    if node is not None and not isinstance(node, zarr.Group):
        raise StoreError(f"{name!r} must be a group, found an array", where=where)
    return node


def dimension_names(arr: zarr.Array) -> tuple[str, ...]:
    """The array's dimension names (Zarr v3 metadata; none in v2)."""
    return tuple(str(n) for n in getattr(arr.metadata, "dimension_names", None) or ())


def read_array(
    arr: zarr.Array, selection: Any = Ellipsis, *, where: str, what: str | None = None
) -> np.ndarray:
    """``arr[selection]`` as a numpy array; transient errors are retried, a chunk that cannot be
    decoded raises :class:`StoreError` naming it (see :func:`chunk_errors`).

    Args:
        arr: an array of the store.
        selection: a basic selection (ints, slices, Ellipsis) or integer/boolean index arrays.
        where: the store, as named in errors (its URL).
        what: what the caller reads (e.g. ``"steps [0, 64)"``), put first in the error.
    """
    with chunk_errors(arr, where, selection, what):
        return retrying(lambda: np.asarray(arr[selection]), f"{where} ({what})" if what else where)


@contextlib.contextmanager
def chunk_errors(
    arr: zarr.Array, where: str, selection: Any = Ellipsis, what: str | None = None
) -> Iterator[None]:
    """Context for a read of ``arr[selection]`` (by zarr, xarray or Dask): an error that a single
    chunk of the selection reproduces becomes a :class:`StoreError` naming the chunk; storage
    errors become theirs; anything else (transient, or not a chunk's fault) propagates."""
    try:
        with storage_errors(where):  # a missing bucket, denied access: one StoreError
            yield
    except StoreError:
        raise
    except Exception as e:
        if is_transient(e):
            raise
        bad = corrupt_chunk(arr, selection)
        if bad is None:
            raise
        raise corrupt_chunk_error(arr, bad[0], bad[1], where, what) from e


def corrupt_chunk(
    arr: zarr.Array, selection: Any = Ellipsis
) -> tuple[tuple[int, ...], Exception] | None:
    """The first chunk covered by ``selection`` that fails to read on its own, with its error;
    None when each reads (or fails only transiently: that says nothing of its bytes)."""
    grid = _grid(arr)
    bounds = _bounds(selection, arr.shape)
    ranges = [
        range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0)
        for (lo, hi), c in zip(bounds, grid, strict=True)
    ]
    for coords in itertools.product(*ranges):
        try:
            np.asarray(arr[_chunk_slices(coords, grid, arr.shape)])
        except Exception as e:
            if storage_error(e, "") is not None or is_transient(e):
                continue
            return coords, e
    return None


def corrupt_chunk_error(
    arr: zarr.Array,
    coords: tuple[int, ...],
    error: BaseException,
    where: str,
    what: str | None = None,
) -> StoreError:
    """The one-line error for chunk ``coords`` of ``arr`` that failed to decode with ``error``."""
    grid = _grid(arr)
    key = chunk_key(arr, coords)
    dims = dimension_names(arr) or tuple(f"dim {i}" for i in range(arr.ndim))
    extent = ", ".join(
        f"{dim} [{c * size}, {min((c + 1) * size, n)})"
        for dim, c, size, n in zip(dims, coords, grid, arr.shape, strict=True)
        if n > size  # only the dimensions the array is split along
    )
    index = ", ".join(str(c) for c in coords)
    return StoreError(
        (f"cannot read {what}: " if what else "")
        + f"chunk ({index}) of array {_name(arr)!r} (key {key}"
        + (f", {extent}" if extent else "")
        + f") is corrupted and cannot be decoded ({_one_line(error)}); {REINGEST}",
        where=where,
    )


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The key of chunk ``coords`` of ``arr`` relative to the store root (``values/c/3/0/0``)."""
    key = arr.metadata.encode_chunk_key(coords)
    path = arr.path.strip("/")
    return f"{path}/{key}" if path else key


def _name(arr: zarr.Array) -> str:
    return arr.path.strip("/") or arr.name


def _grid(arr: zarr.Array) -> tuple[int, ...]:
    # the stored objects are the shards when the array is sharded, else the chunks
    return tuple(arr.shards or arr.chunks)


def _chunk_slices(
    coords: tuple[int, ...], grid: tuple[int, ...], shape: tuple[int, ...]
) -> tuple[slice, ...]:
    return tuple(
        slice(c * size, min((c + 1) * size, n))
        for c, size, n in zip(coords, grid, shape, strict=True)
    )


def _bounds(selection: Any, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[lo, hi)`` per dimension that ``selection`` touches (a superset; the whole array when
    the selection is of a kind not understood here)."""
    full = [(0, n) for n in shape]
    sel = selection if isinstance(selection, tuple) else (selection,)
    if sum(s is Ellipsis for s in sel) > 1:
        return full
    if any(s is Ellipsis for s in sel):
        i = next(i for i, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:i] + (slice(None),) * (len(shape) - len(sel) + 1) + sel[i + 1 :]
    if len(sel) > len(shape):
        return full
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    out = []
    try:
        for s, n in zip(sel, shape, strict=True):
            if isinstance(s, slice):
                r = range(*s.indices(n))
                out.append((min(r), max(r) + 1) if len(r) else (0, 0))
            elif isinstance(s, int | np.integer):
                i = int(s) + (n if s < 0 else 0)
                out.append((i, i + 1))
            else:
                a = np.asarray(s)
                idx = np.flatnonzero(a) if a.dtype == bool else a.astype(np.int64).ravel()
                idx = np.where(idx < 0, idx + n, idx)
                out.append((int(idx.min()), int(idx.max()) + 1) if idx.size else (0, 0))
    except (TypeError, ValueError):
        return full
    return out


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
