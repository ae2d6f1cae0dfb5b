"""Unit tests of the sweep's aggregation and checks (no Ray): Pareto front, export, resume guard."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from stkd_dist.checkpoint import TrainState, load_forecaster, save_checkpoint
from stkd_dist.config import load_config, read_config
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.pipeline.sweep import (
    SweepLayout,
    TrialRow,
    _check_settings,
    _check_teacher_data,
    _settings,
    check_forecast_loss,
    export_best,
    pareto_rows,
    run_sweep,
)
from stkd_dist.storage import open_store
from stkd_dist.train.loop import build_model, build_reader

SPACE = {"distill.alpha": {"uniform": [0.2, 0.9]}}


def row(trial: str, params: int, test_mae: float, val_mae: float = 1.0, **kw: object) -> TrialRow:
    return TrialRow(
        trial=trial,
        params=params,
        val_mae=val_mae,
        test_mae=test_mae,
        test_rmse=test_mae * 1.2,
        test_mape=10.0,
        epochs=3,
        best_epoch=3,
        model="mlp",
        checkpoint=Path("/nowhere") / trial,
        **kw,  # type: ignore[arg-type]
    )


def test_pareto_rows_keep_the_non_dominated_trials_by_size() -> None:
    rows = [
        row("a", 100, 3.0),
        row("b", 200, 2.0),
        row("c", 300, 2.5),  # dominated by b (more parameters, worse)
        row("d", 100, 3.5),  # dominated by a (same size, worse)
        row("e", 50, 4.0),
        row("f", 400, 1.0),
        row("g", 10, math.nan),  # not evaluated: never on the front
    ]
    front = pareto_rows(rows)
    assert [r.trial for r in front] == ["e", "a", "b", "f"]
    assert pareto_rows([]) == []


def test_leaderboard_record_has_settings_and_a_relative_checkpoint(tmp_path: Path) -> None:
    r = dataclasses.replace(
        row("t1", 10, 2.0, settings={"distill.alpha": 0.4}),
        checkpoint=tmp_path / "tune" / "trial_t1" / "checkpoint_000002",
    )
    rec = r.record(tmp_path)
    assert rec["checkpoint"] == "tune/trial_t1/checkpoint_000002"
    assert rec["distill.alpha"] == 0.4 and rec["params"] == 10 and rec["trial"] == "t1"
    assert list(rec)[:5] == ["trial", "kind", "params", "val_mae", "test_mae"]
    assert rec["kind"] == "trial"


def _student_checkpoint(tmp_path: Path, name: str, seed: int, val_mae: float) -> Path:
    from tests.conftest import random_store

    store_path = tmp_path / "ds.zarr"
    if not store_path.exists():
        random_store(store_path, steps=200, nodes=3, channels=1, chunk_steps=64)
    cfg = load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store_path))}",
            "student.model=linear",
            "student.kwargs={}",
            "run.name=u",
        ],
    )
    store = open_store(store_path)
    reader = build_reader(cfg, store)
    torch.manual_seed(seed)
    model = build_model(cfg.student, reader, store)
    info = save_checkpoint(
        tmp_path / "tune" / name / "checkpoint_000001",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": val_mae},
        state=TrainState(epoch=1),
        role="student_sweep",
    )
    return info.path


def test_export_best_is_a_loadable_checkpoint_replaced_atomically(tmp_path: Path) -> None:
    layout = SweepLayout(tmp_path)
    first = dataclasses.replace(
        row("t1", 10, 2.0, val_mae=1.5, settings={"distill.alpha": 0.3}),
        checkpoint=_student_checkpoint(tmp_path, "t1", seed=1, val_mae=1.5),
    )
    out = export_best(first, layout, {"mae": 2.0})
    model, info = load_forecaster(out, role="student_sweep")
    assert out == layout.best and info.val_mae == 1.5 and model.key == "linear"
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["trial"] == "t1" and meta["settings"] == {"distill.alpha": 0.3}
    assert read_config(out / "config.yaml") == info.config

    # a later export replaces it whole, and leaves no temporary folders behind
    second = dataclasses.replace(
        row("t2", 10, 1.0, val_mae=1.2),
        checkpoint=_student_checkpoint(tmp_path, "t2", seed=2, val_mae=1.2),
    )
    export_best(second, layout, {"mae": 1.0})
    _, info2 = load_forecaster(layout.best, role="student_sweep")
    assert info2.val_mae == 1.2 and info2.version != info.version
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_refuses_a_damaged_checkpoint(tmp_path: Path) -> None:
    ckpt = _student_checkpoint(tmp_path, "t1", seed=1, val_mae=1.5)
    (ckpt / "model.pt").write_bytes(b"damaged")
    with pytest.raises(StoreError, match=r"model\.pt has 7 bytes.*incomplete or damaged"):
        export_best(
            dataclasses.replace(row("t1", 1, 1.0), checkpoint=ckpt), SweepLayout(tmp_path), {}
        )
    assert not (tmp_path / "best").exists()


def test_a_run_with_another_sweep_is_not_resumed(tmp_path: Path) -> None:
    layout = SweepLayout(tmp_path)
    cfg = load_config("demo", [f"sweep.space={json.dumps(SPACE)}"])
    settings = _settings(cfg, "teacher-v1")
    with pytest.raises(StoreError, match=r"settings\.json"):
        _check_settings(layout, settings)
    tmp_path.mkdir(exist_ok=True)
    layout.settings.write_text(json.dumps(settings))
    _check_settings(layout, settings)  # the same sweep: fine
    other_space = load_config("demo", ['sweep.space={"distill.beta": {"uniform": [0, 1]}}'])
    for changed in (_settings(other_space, "teacher-v1"), _settings(cfg, "teacher-v2")):
        with pytest.raises(ConfigError) as e:
            _check_settings(layout, changed)
        assert e.value.where == "run.name" and "other settings" in e.value.message
    # what does not change the trials (cluster size) does not block a resume
    wider = load_config("demo", [f"sweep.space={json.dumps(SPACE)}", "cluster.num_workers=4"])
    _check_settings(layout, _settings(wider, "teacher-v1"))


def test_teacher_with_other_windows_is_refused() -> None:
    cfg = load_config("demo")
    other = load_config("demo", ["data.horizon=6"])
    _check_teacher_data(cfg, cfg, "ckpt")
    with pytest.raises(ConfigError, match="other windows") as e:
        _check_teacher_data(other, cfg, "ckpt")
    assert e.value.where == "ckpt"


def test_class_logit_losses_cannot_distil_cached_forecasts() -> None:
    cfg = load_config("demo", [f"sweep.space={json.dumps(SPACE)}"])
    check_forecast_loss(cfg, cfg.sweep.params())
    hinton = load_config("demo", [f"sweep.space={json.dumps(SPACE)}", "distill.loss=hinton"])
    with pytest.raises(ConfigError, match="hinton") as e:
        check_forecast_loss(hinton, hinton.sweep.params())
    assert e.value.where == "distill.loss"


def test_an_empty_space_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = load_config("demo", ["run.name=empty", "sweep.space={}"])
    with pytest.raises(ConfigError, match="is empty") as e:
        run_sweep(cfg, checkpoint="none", storage=tmp_path)
    assert e.value.where == "sweep.space"
    assert not (tmp_path / "runs").exists()


def test_cli_reports_a_bad_space_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stkd_dist.cli import main

    storage = ["--storage", str(tmp_path)]
    assert main([*storage, "sweep", "--config", "demo", "--set", "sweep.space={}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stkd: error: sweep.space: is empty") and "\n" not in err

    bad = 'sweep.space={"distill.alpha": {"gauss": [0.2, 0.9]}}'
    assert main([*storage, "sweep", "--config", "demo", "--set", bad, "--samples", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep.space.distill.alpha: unknown distribution 'gauss'" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()

    assert main([*storage, "sweep", "--config", "demo", "--samples", "0"]) == 2
    assert "sweep.samples: must be > 0" in capsys.readouterr().err


def test_streamed_labels_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    space = f"sweep.space={json.dumps(SPACE)}"
    with pytest.raises(ConfigError, match="must be > 0") as e:
        load_config("demo", [space, "sweep.label_replicas=0"])
    assert e.value.where.endswith("sweep.label_replicas")
    with pytest.raises(ConfigError, match="stream") as e:
        load_config("demo", [space, "sweep.labels=file"])
    assert e.value.where.endswith("sweep.labels")
    # the trials stream from replicas the sweep starts: given servers are refused, naming both
    # ways out, before any stage runs
    cfg = load_config("demo", ["run.name=endpoints", space, "serve.endpoints=127.0.0.1:1"])
    with pytest.raises(ConfigError, match=r"sweep\.labels: cache") as e:
        run_sweep(cfg, checkpoint="none", storage=tmp_path)
    assert e.value.where == "serve.endpoints"
    assert not (tmp_path / "runs").exists()
