"""Which days of the week each split holds.

A day-of-week embedding learns one vector per weekday from the training split only. A store of a
week or so (Los-loop: 7 days; the PEMS08 prefix: 4.5 days) holds some weekdays only in the
validation or test split: their vectors keep their random initialisation, so the forecasts of those
days change with the seed (on Los-loop the STID student's test MAE spread 3.75 to 4.29 over seeds
with ``dow_dim: 8`` and 3.67 to 3.69 with ``dow_dim: 0``, bench/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stkd_dist.data.windows import SplitSpec

#: Monday = 0, as ``pandas.DatetimeIndex.day_of_week``
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def split_weekdays(time: pd.DatetimeIndex, splits: SplitSpec) -> dict[str, frozenset[int]]:
    """``{split: weekdays (Monday = 0) of its steps}`` for the ``time`` axis of a store."""
    days = np.asarray(time.day_of_week, dtype=np.int64)  # [steps]
    return {
        name: frozenset(int(d) for d in np.unique(days[lo:hi]))
        for name, (lo, hi) in splits.step_ranges(len(time)).items()
    }


def unseen_weekdays(time: pd.DatetimeIndex, splits: SplitSpec) -> list[int]:
    """The weekdays of the validation and test splits that the training split does not hold."""
    held = split_weekdays(time, splits)
    return sorted((held["val"] | held["test"]) - held["train"])


def weekday_names(days: list[int] | frozenset[int]) -> str:
    """``"Thu, Fri"`` for ``[3, 4]``."""
    return ", ".join(WEEKDAYS[d] for d in sorted(days))
