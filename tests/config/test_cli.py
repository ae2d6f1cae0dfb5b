"""``stkd config`` list / show / validate through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from stkd_dist.cli import main
from stkd_dist.config import config_from_text, load_config


def test_list_names_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "los-loop", "pems08-prefix"):
        assert name in out


def test_show_prints_yaml_that_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "demo"]) == 0
    out = capsys.readouterr().out
    assert config_from_text(out, "shown") == load_config("demo")
    assert main(["config", "show", "demo", "--set", "teacher.schedule.epochs=9"]) == 0
    assert config_from_text(capsys.readouterr().out, "x").teacher.schedule.epochs == 9
    assert main(["config", "show", "los-loop", "--raw"]) == 0
    assert capsys.readouterr().out.startswith("# Los-loop")


def test_validate_ok_and_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("data: {dataset: x}\nteacher: {kwargs: {blocks: 2}}\n")
    assert main(["config", "validate", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 8\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one line, no traceback
    assert err[0].startswith("stkd: error: ")
    assert "bad.yaml: data.batch_sise" in err[0] and "did you mean 'batch_size'?" in err[0]
