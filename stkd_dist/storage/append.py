"""Appending time steps to a canonical store in place (``stkd ingest --append``).

New steps must continue the store: the same node ids and channel names (in any order: they are
put in the store's), the same step, and a first timestamp exactly one step after the store's
last, so that a window's steps stay evenly spaced. Anything else is refused before the store is
touched.

Only what changes is written and hashed: the arrays grow along ``time`` (the store's last time
chunk is rewritten with its old steps unchanged, then the new chunks are added), the fingerprint
is extended from the digests of the blocks before the old end (:mod:`.fingerprint`), and cached
statistics stay valid (they are keyed by the step range they cover, whose readings do not
change). The previous fingerprints are kept in ``fingerprint_history``, newest last, with the
steps each covered, so a teacher trained on the store before an append can tell which part of
the store it saw.

An append is made safe to kill by a marker: before the first array grows the root attributes get
``stkd_append_in_progress`` (the old length and attributes), and it is removed with the final
attributes. A reader refuses a store with the marker (:class:`~.store.DatasetStore`), and the next
append rolls the interrupted one back first (arrays shrunk to the old length, old attributes),
so a store is only ever seen before or after a whole append.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from stkd_dist.compute import dask_scheduler
from stkd_dist.errors import InputError
from stkd_dist.location import Location, PathInput, location, storage_errors, url, zarr_store
from stkd_dist.storage.chunks import member_array
from stkd_dist.storage.fingerprint import FINGERPRINT_BLOCK, fingerprint_store, stored_blocks
from stkd_dist.storage.layout import APPEND_ATTR, DATA_ARRAYS, DIMS, consolidate
from stkd_dist.storage.store import DatasetStore

#: root attributes an append changes (and a rollback restores)
CHANGED_ATTRS = (
    "fingerprint",
    "missing",
    "missing_fraction",
    "fingerprint_history",
    "sources",
    "nonfinite_count",
    "masked_missing_value_count",
)


@dataclass(frozen=True)
class AppendResult:
    """What an append did.

    Attributes:
        path: the store.
        steps_before: the store's length before.
        steps_added: the steps appended.
        start, end: the first and last appended timestamp.
        fingerprint: the store's fingerprint now.
        previous_fingerprint: its fingerprint before.
        rolled_back: an interrupted earlier append was rolled back first.
    """

    path: Location
    steps_before: int
    steps_added: int
    start: pd.Timestamp
    end: pd.Timestamp
    fingerprint: str
    previous_fingerprint: str
    rolled_back: bool


def _ids(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _order(have: list[str], given: list[str], what: str, where: str) -> list[int] | None:
    """Positions in ``given`` of the store's ``have`` (None: same order); refuses other sets."""
    if given == have:
        return None
    missing = [n for n in have if n not in set(given)]
    extra = [n for n in given if n not in set(have)]
    if missing or extra or len(given) != len(have):
        parts = []
        if missing:
            parts.append(f"missing {_ids(missing)}")
        if extra:
            parts.append(f"not in the store: {_ids(extra)}")
        raise InputError(
            f"the new steps' {what} differ from the store's ({'; '.join(parts) or 'repeated'}): "
            f"appended steps must have the store's {len(have)} {what}",
            where=where,
        )
    index = {n: i for i, n in enumerate(given)}
    return [index[n] for n in have]


def check_continuation(
    store_time_end: pd.Timestamp, store_freq: str, time: pd.DatetimeIndex, freq: str, where: str
) -> None:
    """Refuse new steps that overlap the store, leave a gap after it or have another step."""
    step, theirs = (
        pd.tseries.frequencies.to_offset(store_freq),
        pd.tseries.frequencies.to_offset(freq),
    )
    if step != theirs:
        raise InputError(
            f"the new steps are {freq} apart, the store's {store_freq}: give the store's step "
            f"(--freq {store_freq})",
            where=where,
        )
    expected = store_time_end + step
    first = time[0]
    if first == expected:
        return
    if first <= store_time_end:
        overlap = int((time <= store_time_end).sum())
        raise InputError(
            f"the new steps start at {first}, but the store already has steps up to "
            f"{store_time_end}: {overlap} step(s) overlap; append only steps after "
            f"{store_time_end} (the next one is {expected})",
            where=where,
        )
    gap = len(pd.date_range(expected, first, freq=step, inclusive="left"))
    raise InputError(
        f"the new steps start at {first}, but the store ends at {store_time_end}: a gap of "
        f"{gap} step(s) from {expected}; appended steps must start at {expected} (give --start "
        "or fill the gap)",
        where=where,
    )


def rollback(path: PathInput | Location) -> bool:
    """Undo an interrupted append of the store at ``path``; False when there was none."""
    dest = location(path)
    root = zarr.open_group(zarr_store(dest, read_only=False), mode="r+", zarr_format=3)
    marker: Any = root.attrs.get(APPEND_ATTR)
    if marker is None:
        return False
    steps = int(marker["steps"])
    where = url(dest)
    for name in (*DATA_ARRAYS, "time"):
        arr = member_array(root, name, where)
        if arr.shape[0] != steps:
            arr.resize((steps, *arr.shape[1:]))
    # the digests of the old end's block were replaced: hash that block again (bounded)
    known = stored_blocks(dest)
    if known is not None:
        keep = steps // FINGERPRINT_BLOCK
        fingerprint_store(dest, (known[0][:keep], known[1][:keep]))
    attrs = dict(marker["attrs"])
    for key in CHANGED_ATTRS:
        if key in attrs:
            root.attrs[key] = attrs[key]
        elif key in root.attrs:
            del root.attrs[key]
    del root.attrs[APPEND_ATTR]
    consolidate(dest)
    return True


def append_steps(
    path: PathInput | Location,
    values: da.Array,
    mask: da.Array,
    time: pd.DatetimeIndex,
    node_ids: list[str],
    channels: list[str],
    freq: str,
    where: str,
    source: dict[str, str] | None = None,
    counts: dict[str, int] | None = None,
) -> AppendResult:
    """Append ``values``/``mask`` (``[t, node, channel]``) at ``time`` to the store at ``path``.

    Args:
        path: the store (local path or object-store URL).
        values, mask: the new readings and where they were observed.
        time: one timestamp per new step.
        node_ids, channels: the new data's node ids and channel names, in its order.
        freq: the new data's step.
        where: the source, for error messages.
        source: ``{"name", "sha256"}`` of the source file, added to the store's ``sources``.
        counts: the new steps' ``nonfinite_count`` and ``masked_missing_value_count``, added to
            the store's.

    Raises:
        InputError: the new steps do not continue the store; nothing is written then.
        StoreError: the store cannot be opened or written; an append that fails while writing
            is rolled back.
    """
    dest = location(path)
    with storage_errors(dest):
        rolled_back = rollback(dest)
        store = DatasetStore(dest, mode="r")
        if list(values.shape[1:]) != [len(node_ids), len(channels)] or values.shape != mask.shape:
            raise InputError(
                f"values {values.shape} and mask {mask.shape} do not match {len(node_ids)} node "
                f"ids and {len(channels)} channels",
                where=where,
            )
        nodes = _order(store.node_ids, node_ids, "node ids", where)
        chans = _order(store.channels, channels, "channels", where)
        check_continuation(store.time[-1], store.freq, time, freq, where)
        if nodes is not None:
            values, mask = values[:, nodes, :], mask[:, nodes, :]
        if chans is not None:
            values, mask = values[:, :, chans], mask[:, :, chans]

        before, old_fp = store.steps, store.fingerprint
        old = {k: store.attrs[k] for k in CHANGED_ATTRS if k in store.attrs}
        root = zarr.open_group(zarr_store(dest, read_only=False), mode="r+", zarr_format=3)
        # the marker goes in before any array grows: a reader of a half-appended store refuses it
        root.attrs[APPEND_ATTR] = {"steps": before, "attrs": old}
        consolidate(dest)
        try:
            _write(dest, values, mask, time, store.chunks, before, dict(root.attrs))
            known = stored_blocks(dest)
            keep = before // FINGERPRINT_BLOCK
            fingerprint = fingerprint_store(
                dest, None if known is None else (known[0][:keep], known[1][:keep])
            )
            history = [
                *old.get("fingerprint_history", []),
                {
                    "fingerprint": old_fp,
                    "steps": before,
                    "end": str(store.time[-1]),
                    "until": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                },
            ]
            sources = [*old.get("sources", []), *([source] if source else [])]
            added = {k: int(old.get(k) or 0) + int(n) for k, n in (counts or {}).items()}
            final = {**fingerprint, **added, "fingerprint_history": history, "sources": sources}
            root.attrs.update(final)
            # consolidated first (marker still set), so that the root metadata written by the
            # commit below already holds the grown arrays: no moment shows new attributes
            # over old shapes
            consolidate(dest)
            del root.attrs[APPEND_ATTR]  # the commit: the appended store is whole
            consolidate(dest)
        except BaseException:
            rollback(dest)
            raise
    return AppendResult(
        path=dest,
        steps_before=before,
        steps_added=len(time),
        start=time[0],
        end=time[-1],
        fingerprint=str(fingerprint["fingerprint"]),
        previous_fingerprint=old_fp,
        rolled_back=rolled_back,
    )


def _write(
    dest: Location,
    values: da.Array,
    mask: da.Array,
    time: pd.DatetimeIndex,
    chunks: tuple[int, int, int],
    before: int,
    attrs: dict[str, Any],
) -> None:
    # Dask chunks on the store's chunk grid: the first one fills the store's last (partial)
    # chunk, so no two Dask tasks write the same Zarr chunk
    step = chunks[0]
    head = min(len(time), (step - before % step) % step)
    rest = len(time) - head
    sizes = (
        ((head,) if head else ())
        + (step,) * (rest // step)
        + ((rest % step,) if rest % step else ())
    )
    grid = (sizes, chunks[1], chunks[2])
    mask = mask.astype(bool).rechunk(grid)
    values = da.where(mask, values.astype(np.float32), np.float32(np.nan)).rechunk(grid)
    ds = xr.Dataset(
        {"values": (DIMS, values), "mask": (DIMS, mask)},
        coords={"time": ("time", pd.DatetimeIndex(time).values.astype("datetime64[ns]"))},
        # xarray writes the dataset's attributes over the group's: give it the group's own
        # (the append marker included), so they are unchanged whenever the write stops
        attrs=attrs,
    )
    with dask_scheduler():
        # xarray aligns the new chunks with the store's (its last partial chunk is completed)
        # and encodes time with the store's own units
        ds.to_zarr(
            zarr_store(dest, read_only=False),
            mode="a",
            append_dim="time",
            zarr_format=3,
            consolidated=False,
            write_empty_chunks=True,
        )
