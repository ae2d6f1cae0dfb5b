"""Every built-in preset ships a sweep that runs as it is: its space, its budget, and a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stkd_dist.checkpoint import read_checkpoint
from stkd_dist.config import load_config, to_mapping
from stkd_dist.config.loader import preset_names
from stkd_dist.config.validate import validate_config, validate_model
from stkd_dist.errors import ConfigError
from stkd_dist.pipeline.sweep_tuner import pbt_mutations
from stkd_dist.pipeline.tune_space import apply_params, check_space, to_tune
from tests.pipeline.sweep_env import make_env, read_board

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("demo", "los-loop", "pems08-prefix")


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def test_the_presets_are_the_ones_checked_here() -> None:
    assert sorted(preset_names()) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_ships_a_space_that_applies_to_its_config(preset: str) -> None:
    cfg = load_config(preset)
    validate_config(cfg, roles=("teacher", "student"))
    specs = check_space(cfg)  # every bound and choice, applied to the whole config and checked
    keys = [s.key for s in specs]
    assert {"distill.alpha", "student.optim.lr"} <= set(keys)
    assert any(k.startswith("student.kwargs.") for k in keys)  # the student's width
    base = to_mapping(cfg)
    for spec in specs:
        # a setting the preset's own config has: the sweep varies it around the preset's value
        assert _get(base, spec.key) is not None, spec.key
        for value in spec.candidates:
            trial = apply_params(cfg, {spec.key: value})
            assert _get(to_mapping(trial), spec.key) == value, (spec.key, value)  # not dropped
    space = to_tune(specs)
    for _ in range(20):  # what Tune draws makes a valid student for this preset
        draw = {k: domain.sample() for k, domain in space.items()}
        trial = apply_params(cfg, draw)
        validate_model(trial, "student")
        assert trial.student.kwargs["embed_dim"] == draw["student.kwargs.embed_dim"]
    # a budget that runs: several trials, each at most the preset student's own epochs
    sweep = cfg.sweep
    assert sweep.scheduler == "asha" and sweep.samples >= 4
    assert 1 <= sweep.scheduler_settings["grace_period"] < sweep.max_epochs
    assert sweep.max_epochs <= cfg.student.schedule.epochs


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_switches_to_pbt(preset: str) -> None:
    try:
        cfg = load_config(preset, ["sweep.scheduler=pbt"])
    except ConfigError as e:  # a preset tuning ASHA says which key to clear
        assert e.where is not None and e.where.endswith("sweep.grace_period")
        cfg = load_config(preset, ["sweep.scheduler=pbt", "sweep.grace_period=null"])
    # the width is drawn once per trial; PBT mutates the rest
    assert set(pbt_mutations(cfg.sweep.params())) == {"distill.alpha", "student.optim.lr"}


@pytest.mark.slow
@pytest.mark.integration
def test_stkd_sweep_runs_the_demo_preset_as_it_is(tmp_path: Path) -> None:
    """``stkd sweep --config demo`` with only its budget cut down (and a small store and
    teacher, so that it runs in seconds): the preset's own space, scheduler and student."""
    env = make_env(tmp_path)
    storage = tmp_path / "storage"
    cmd = [sys.executable, "-m", "stkd_dist.cli", "--storage", str(storage), "sweep"]
    cmd += ["--config", "demo", "--checkpoint", str(env.teacher), "--run-name", "demo-sweep"]
    cmd += ["--set", f"data.dataset={json.dumps(str(env.store))}", "--samples", "2"]
    cmd += ["--max-epochs", "2"]
    environ = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    sweep_dir = storage / "runs" / "demo-sweep" / "sweep"
    demo = load_config("demo")
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == summary["evaluated"] == 2
    assert set(summary["space"]) == set(demo.sweep.space)
    assert sum(summary["stop_reasons"].values()) == 2 and summary["scheduler"]["name"] == "asha"
    board = read_board(sweep_dir / "leaderboard.csv")[0]
    assert len(board) == 2 and set(demo.sweep.space) <= set(board.columns)
    assert set(board["student.kwargs.embed_dim"]) <= {4, 8, 16}
    best = read_checkpoint(sweep_dir / "best")
    # the preset's student (mlp with the preset's other widths), with the drawn settings
    assert best.config.student.model == "mlp"
    assert best.config.student.kwargs["node_dim"] == demo.student.kwargs["node_dim"]
    assert best.config.student.kwargs["embed_dim"] in (4, 8, 16)
    assert 0.2 <= best.config.distill.alpha <= 0.9
    assert "best trial" in proc.stdout
