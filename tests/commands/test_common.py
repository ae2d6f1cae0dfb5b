"""Helpers shared by the training commands: the weekday warning of train-teacher/train-student."""

from __future__ import annotations

from pathlib import Path

import pytest

from stkd_dist.commands._common import warn_untrained_weekdays
from stkd_dist.config import load_config
from stkd_dist.testing import random_store


def test_training_commands_warn_about_weekdays_their_model_cannot_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2016 five-minute steps from Monday 2024-01-01: one week, the 70 % training split ends on
    # Friday, so the validation/test splits hold Saturday and Sunday only
    random_store(tmp_path / "datasets" / "week.zarr", steps=2016, nodes=3, channels=1)
    storage = str(tmp_path)
    cfg = load_config("demo", ["data.dataset=week", "student.kwargs.dow_dim=8"])
    warn_untrained_weekdays(cfg, storage, "student")
    out = capsys.readouterr().out
    assert out == (
        "warning: the training split holds Mon, Tue, Wed, Thu, Fri only; the validation/test "
        "splits also hold Sat, Sun, whose day-of-week embedding the student never trains: set "
        "student.kwargs.dow_dim to 0 for a store this short\n"
    )
    # the demo teacher (stgnn) reads the weekday as a number: nothing to say for train-teacher
    warn_untrained_weekdays(cfg, storage, "teacher")
    # a store that is not there is the training call's error to report, not this check's
    warn_untrained_weekdays(load_config("demo", ["data.dataset=absent"]), storage, "student")
    assert capsys.readouterr().out == ""
