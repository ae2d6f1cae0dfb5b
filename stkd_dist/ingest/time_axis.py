"""The time axis of an ingested store: the source's timestamps, or ``--start`` + ``--freq``.

The store requires a regular axis (every step ``freq`` after the previous one). Source timestamps
are kept when they are regular; otherwise the error names the first step that breaks the rhythm,
since silently regridding would shift readings in time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import DEFAULT_FREQ, DEFAULT_START, parse_freq, parse_timestamp


def infer_freq(time: pd.DatetimeIndex) -> str | None:
    """pandas' inferred frequency string of ``time``, or None when irregular."""
    if len(time) == 2:
        return to_offset(time[1] - time[0]).freqstr if time[1] > time[0] else None
    # pandas 3 warns that infer_freq will return an offset; ask for that behaviour now
    with pd.option_context("future.infer_freq_returns_offset", True):
        offset = pd.infer_freq(time)
    return None if offset is None else offset.freqstr


def build_time_axis(
    source_time: pd.DatetimeIndex | None,
    steps: int,
    freq: str | None,
    start: str | None,
    where: str,
) -> tuple[pd.DatetimeIndex, str]:
    """The store's ``(time, freq)``.

    Args:
        source_time: timestamps from the source, or None.
        steps: number of steps of the data.
        freq: ``--freq`` or None (inferred from the source, else 5min).
        start: ``--start`` or None; when given it replaces the source's timestamps.
        where: the source, for error messages.
    """
    if start is not None or source_time is None:
        f = parse_freq(freq or DEFAULT_FREQ)
        t0 = parse_timestamp(start or DEFAULT_START, "--start")
        return pd.date_range(t0, periods=steps, freq=f), f

    time = pd.DatetimeIndex(source_time)
    assert len(time) == steps, (len(time), steps)
    if time.hasnans:
        raise InputError("the time axis has missing timestamps (NaT)", where=where)
    backwards = np.flatnonzero(np.diff(time.asi8) <= 0)
    if len(backwards):
        k = int(backwards[0]) + 1
        raise InputError(
            f"the time axis is not increasing: step {k} is {time[k]}, after {time[k - 1]}; "
            "timestamps must be increasing and evenly spaced",
            where=where,
        )
    step = parse_freq(freq) if freq is not None else infer_freq(time)
    if step is not None:
        expected = pd.date_range(time[0], periods=steps, freq=step)
        if expected.equals(time):
            return time, step
        k = int(np.flatnonzero(expected != time)[0])
        rule = f"expected {expected[k]} for steps of {step}"
    else:
        # no single step fits: report the first gap that differs from the first one
        gaps = np.diff(time.asi8)
        odd = np.flatnonzero(gaps != gaps[0])
        k = int(odd[0]) + 1 if len(odd) else 1
        rule = f"the first step is {pd.Timedelta(int(gaps[0]))} long"
    raise InputError(
        f"the time axis is not regular: step {k} is {time[k]} ({rule}); timestamps must be "
        "increasing and evenly spaced (pass --start and --freq to impose a regular axis)",
        where=where,
    )
