"""``data.target_fraction``: only the last hours of the training split keep their targets."""

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
    return make_store("tf", steps=STEPS, nodes=3, channels=1, chunk_steps=256, missing=0.05)


def _reader(path: Path, fraction: float) -> WindowReader:
    return WindowReader(open_store(path), WindowSpec(12, 6), SplitSpec(), target_fraction=fraction)


# 7 training days = 168 hours: round(0.25 x 168) = 42, round(0.05 x 168) = 8, round(0.5 x 168)
@pytest.mark.parametrize(("fraction", "hours"), [(0.25, 42), (0.05, 8), (0.5, 84), (0.001, 1)])
def test_only_the_last_hours_of_training_keep_their_targets(
    store: Path, fraction: float, hours: int
) -> None:
    full, few = _reader(store, 1.0), _reader(store, fraction)
    st = open_store(store)
    n_train = round(STEPS * 0.7)  # the default split: 7 days of training steps
    assert n_train == 288 * 7
    # the reference: steps of the last `hours` whole hours of the training split, counted here
    first_kept = n_train - 12 * hours
    assert pd.Timestamp(st.time[first_kept]) == pd.Timestamp(st.time[0]).normalize() + pd.Timedelta(
        hours=168 - hours
    )
    train = full.windows("train")
    idx = np.asarray(train)
    a, b = full.batch(idx), few.batch(idx)
    np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())  # inputs are unchanged
    steps = idx[:, None] + 12 + np.arange(6)  # [window, H] the target steps
    kept = steps >= first_kept
    expect = a.mask.numpy() & kept[:, :, None, None]
    np.testing.assert_array_equal(b.mask.numpy(), expect)
    assert b.mask.sum() < a.mask.sum()
    # validation and test are never reduced
    for split in ("val", "test"):
        w = np.asarray(full.windows(split))
        np.testing.assert_array_equal(full.batch(w).mask.numpy(), few.batch(w).mask.numpy())
    # the statistics come from every training reading, as without the setting
    np.testing.assert_array_equal(full.stats.mean, few.stats.mean)


def test_the_whole_share_changes_nothing(store: Path) -> None:
    idx = np.asarray(_reader(store, 1.0).windows("train"))
    assert _reader(store, 1.0).target_keep is None
    np.testing.assert_array_equal(
        _reader(store, 1.0).batch(idx).mask.numpy(),
        WindowReader(open_store(store), WindowSpec(12, 6), SplitSpec()).batch(idx).mask.numpy(),
    )


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_a_share_outside_0_1_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="must be in \\(0, 1\\]") as e:
        load_config("demo", [f"data.target_fraction={bad}"])
    assert "target_fraction" in str(e.value.where)
