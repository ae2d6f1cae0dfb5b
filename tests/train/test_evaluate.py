"""``stkd evaluate``: checkpoint metrics next to the baselines, and the fingerprint check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stkd_dist.baselines import evaluate_baselines
from stkd_dist.cli import main
from stkd_dist.metrics import evaluate_metrics
from stkd_dist.storage import open_store
from tests.train.conftest import tiny_config, write_checkpoint


def test_evaluate_json_matches_an_independent_computation(
    small_store: Path, storage_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(small_store, "ev", "data.horizon=3")
    ckpt = storage_root / "runs" / "ev" / "teacher" / "epoch_0000"
    model, reader = write_checkpoint(ckpt, cfg, epoch=0, val_mae=1.0)

    assert main(["evaluate", "--checkpoint", "ev", "--json", "--batch-size", "7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == str(ckpt)
    assert out["dataset"] == "ck" and out["split"] == "test"
    assert out["version"].startswith("ev-e0-")

    # the same numbers from all test windows in one batch, read by random access
    batch = reader.batch(list(reader.windows("test")))
    model.eval()
    with torch.no_grad():
        expected = evaluate_metrics(model.forward_batch(batch), batch.y, batch.mask)
    m = out["model"]
    assert m["mae"] == pytest.approx(expected.mae, rel=1e-6)
    assert m["rmse"] == pytest.approx(expected.rmse, rel=1e-6)
    assert m["mape"] == pytest.approx(expected.mape, rel=1e-6)
    assert m["mae_per_horizon"] == pytest.approx(expected.mae_h, rel=1e-6)
    assert len(m["rmse_per_horizon"]) == len(m["mape_per_horizon"]) == 3

    baselines = evaluate_baselines(reader, "test", 64)
    for name in ("last_value", "historical_average"):
        assert out[name]["mae"] == pytest.approx(baselines[name].mae, rel=1e-6)
        assert len(out[name]["mae_per_horizon"]) == 3
        assert out[name]["rmse"] >= out[name]["mae"] > 0


def test_evaluate_table_and_fingerprint_mismatch(
    small_store: Path,
    make_store: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tiny_config(small_store, "ev2", "data.horizon=3")
    write_checkpoint(tmp_path / "ckpt", cfg, epoch=1, val_mae=1.0)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--split", "val"]) == 0
    text = capsys.readouterr().out
    for word in ("checkpoint", "last_value", "historical_average", "MAE per horizon"):
        assert word in text

    other = make_store("other", steps=200, nodes=4, channels=1, chunk_steps=50, seed=7)
    code = main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(other)])
    assert code == 2
    err = capsys.readouterr().err
    assert open_store(small_store).fingerprint in err
    assert open_store(other).fingerprint in err
    assert err.count("\n") == 1 and "Traceback" not in err
