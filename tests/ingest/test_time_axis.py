"""The store's time axis from source timestamps or --start/--freq."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from stkd_dist.errors import ConfigError, InputError
from stkd_dist.ingest.pipeline import mask_readings
from stkd_dist.ingest.time_axis import build_time_axis


def test_source_timestamps_kept_and_freq_inferred():
    t = pd.date_range("2012-03-01", periods=6, freq="5min")
    time, freq = build_time_axis(t, 6, None, None, "src")
    assert time.equals(t) and freq == "5min"


def test_two_steps_infer_their_gap():
    t = pd.DatetimeIndex(["2020-01-01 00:00", "2020-01-01 00:30"])
    assert build_time_axis(t, 2, None, None, "src")[1] == "30min"


def test_start_replaces_source_timestamps():
    t = pd.date_range("2012-03-01", periods=4, freq="5min")
    time, freq = build_time_axis(t, 4, "h", "2001-01-01 06:00", "src")
    assert time[0] == pd.Timestamp("2001-01-01 06:00") and freq == "h"
    assert time[-1] == pd.Timestamp("2001-01-01 09:00")


def test_default_axis_without_timestamps():
    time, freq = build_time_axis(None, 3, None, None, "src")
    assert freq == "5min" and time[0] == pd.Timestamp("2000-01-01")


@pytest.mark.parametrize(
    ("stamps", "freq", "message"),
    [
        (["00:00", "00:05", "00:15", "00:20"], None, "step 2"),
        (["00:00", "00:05", "00:10"], "10min", "step 1 is .*expected .* for steps of 10min"),
        (["00:10", "00:05", "00:00"], None, "not increasing: step 1 is 2020-01-01 00:05:00"),
    ],
)
def test_irregular_axis_names_the_step(stamps, freq, message):
    t = pd.DatetimeIndex([f"2020-01-01 {s}" for s in stamps])
    with pytest.raises(InputError, match=message) as info:
        build_time_axis(t, len(t), freq, None, "data.csv")
    assert info.value.where == "data.csv"


def test_bad_freq_is_a_config_error():
    with pytest.raises(ConfigError, match="not a pandas frequency"):
        build_time_axis(None, 3, "fortnightly-ish", None, "src")


def test_missing_value_compared_in_source_dtype():
    x = np.array([[0.1, 0.2], [np.nan, 0.1]], dtype=np.float32)[:, :, None]
    mask, nonfinite, equal = mask_readings(da.from_array(x), 0.1)
    assert mask.compute()[:, :, 0].tolist() == [[False, True], [False, False]]
    assert int(nonfinite.sum().compute()) == 1
    assert int(equal.sum().compute()) == 2
