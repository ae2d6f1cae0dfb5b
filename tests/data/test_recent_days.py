"""``data.recent_days``: training windows of the last days of the training split only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stkd_dist.config import load_config
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import SplitSpec, WindowSpec
from stkd_dist.errors import ConfigError
from stkd_dist.storage import open_store

STEPS = 288 * 10  # ten days of 5-minute steps, from midnight


@pytest.fixture
def store(make_store: Callable[..., Path]) -> Path:
    return make_store("rd", steps=STEPS, nodes=3, channels=1, chunk_steps=256)


@pytest.mark.parametrize(("days", "stride"), [(1, 1), (3, 1), (2, 5), (30, 1)])
def test_training_windows_start_in_the_last_days(store: Path, days: int, stride: int) -> None:
    window = WindowSpec(12, 6, stride)
    full = WindowReader(open_store(store), window, SplitSpec())
    recent = WindowReader(open_store(store), window, SplitSpec(), recent_days=days)
    st = open_store(store)
    train = full.windows("train")
    # the reference: the first step on or after midnight of the split's last `days` days
    last_day = pd.Timestamp(st.time[train.stop + 18 - 2]).normalize()  # the split's last step
    first_day = max(last_day - pd.Timedelta(days=days - 1), pd.Timestamp(st.time[0]).normalize())
    first_step = int(np.searchsorted(np.asarray(st.time), np.datetime64(first_day)))
    want = [w for w in train if w >= first_step]
    assert list(recent.windows("train")) == want
    for split in ("val", "test"):  # never reduced
        assert recent.windows(split) == full.windows(split)
    np.testing.assert_array_equal(recent.stats.mean, full.stats.mean)


def test_recent_days_must_be_a_positive_count() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["data.recent_days=0"])
    assert str(err.value.where).endswith("data.recent_days")
