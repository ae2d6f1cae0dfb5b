"""Checks of a config against the data: day-of-week embeddings a short store cannot train."""

from __future__ import annotations

import pandas as pd

from stkd_dist.config import load_config
from stkd_dist.config.validate import weekday_check


def test_weekday_check_names_the_models_with_untrained_weekday_embeddings() -> None:
    week = pd.date_range("2000-01-01", periods=2016, freq="5min")  # Sat to Fri
    cfg = load_config("demo", ["student.kwargs.dow_dim=8"])
    entry = weekday_check(cfg, week)
    assert entry is not None
    assert entry["unseen_weekdays"] == [3, 4] and entry["roles"] == ["student"]
    assert entry["message"] == (
        "warning: the training split holds Mon, Tue, Wed, Sat, Sun only; the validation/test "
        "splits also hold Thu, Fri, whose day-of-week embedding the student never trains: set "
        "student.kwargs.dow_dim to 0 for a store this short"
    )
    # the stgnn teacher reads the weekday as a number, it learns no vector per weekday
    assert weekday_check(load_config("demo", ["student.kwargs.dow_dim=0"]), week) is None
    four_weeks = pd.date_range("2000-01-01", periods=8064, freq="5min")
    assert weekday_check(cfg, four_weeks) is None
    # train-teacher and train-student check the model they train
    assert weekday_check(cfg, week, roles=("teacher",)) is None
    assert weekday_check(cfg, week, roles=("student",))["roles"] == ["student"]
    both = load_config("demo", ["teacher.model=staeformer", "teacher.kwargs={}"])
    assert weekday_check(both, week)["roles"] == ["teacher", "student"]
