"""The controller-side epoch reporter (no Ray needed: it is called with the ranks' metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stkd_dist.config import ClusterSection
from stkd_dist.train.ray_session import EpochReporter, cluster_address, read_history


def metrics(epoch: int, digest: str, rank: int) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.25,
        "val_mae": 2.5,
        "val_rmse": 3.0,
        "lr": 1e-3,
        "samples_per_s": 120.0,
        "epoch_time_s": 2.0,
        "best_epoch": epoch,
        "rank": rank,
        "param_digest": digest,
    }


def test_reporter_prints_a_line_and_records_every_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reporter = EpochReporter(str(tmp_path), epochs=5)
    reporter.after_report(None, [metrics(0, "aa", 0), metrics(0, "aa", 1)], None)
    reporter.after_report(None, [metrics(1, "bb", 0), metrics(1, "cc", 1)], None)
    out, err = capsys.readouterr()
    assert "epoch   1/5  train_loss 1.2500  val_mae 2.5000*" in out
    assert "120 samples/s" in out and "lr 1.00e-03" in out
    assert "ranks disagree on the model parameters after epoch 1" in err
    history = read_history(tmp_path)
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["ranks_in_sync"] for h in history] == [True, False]
    assert history[1]["param_digests"] == ["bb", "cc"]
    # a line cut short by a crash is skipped
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"epoch": 2, "tra')
    assert len(read_history(tmp_path)) == 2


def test_cluster_address_prefers_config_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(ClusterSection()) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(ClusterSection()) == "10.0.0.1:6379"
    assert cluster_address(ClusterSection(address="auto")) == "auto"
