"""Greedy weight soup, top-k ensemble and their exports (no Ray); golden values from NumPy.

Covers :mod:`stkd_dist.pipeline.sweep_combine` and :mod:`stkd_dist.pipeline.sweep_aggregate`.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stkd_dist.checkpoint import TrainState, load_forecaster, save_checkpoint
from stkd_dist.config import load_config, read_config
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import InputError
from stkd_dist.location import Location, location, read_json
from stkd_dist.models import Forecaster
from stkd_dist.pipeline.sweep_aggregate import Aggregates, aggregate, load_ensemble
from stkd_dist.pipeline.sweep_combine import (
    MeanEnsemble,
    architecture,
    average_states,
    greedy_soup,
)
from stkd_dist.pipeline.sweep_results import SweepLayout, TrialRow
from stkd_dist.pipeline.tune_trial import ROLE
from stkd_dist.storage import open_store
from stkd_dist.testing import random_store
from stkd_dist.train.evaluate import evaluate_checkpoint, predict_metrics
from stkd_dist.train.loop import build_model, build_reader

# -- greedy soup on hand-built weights ---------------------------------------------------------

W_TRUE = np.array([1.0, -1.0])
U, V = np.array([1.0, -1.0]), np.array([1.0, 1.0])  # orthogonal error directions
# With isotropic inputs the MAE of weights w is ∝ |w - W_TRUE|: the individual errors rise from
# A to D; averaging A with B (orthogonal errors) helps, adding C (A's direction) hurts, and D
# (cancelling B) helps again although it is the worst alone: greedy keeps scanning after a miss.
MEMBERS = {
    "A": W_TRUE + 0.2 * U,
    "B": W_TRUE + 0.25 * V,
    "C": W_TRUE + 0.3 * U,
    "D": W_TRUE - 0.32 * V,
}


class TinyLinear(nn.Module):
    """``y = x @ w`` with an integer buffer (what a soup must not average)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def _state(w: np.ndarray, steps: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=torch.float32), "steps": torch.tensor(steps)}


def _np_mae(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x @ w.astype(np.float32).astype(np.float64) - y).mean())


def _np_soup(names: list[str]) -> np.ndarray:
    stacked = np.stack([MEMBERS[n].astype(np.float32) for n in names]).astype(np.float64)
    return stacked.mean(0).astype(np.float32)


def test_greedy_soup_keeps_exactly_the_members_that_lower_validation_mae() -> None:
    x = np.random.default_rng(0).normal(size=(4000, 2))
    y = x @ W_TRUE
    # the construction, checked in NumPy: ranked by validation MAE, and each decision's direction
    alone = [_np_mae(MEMBERS[n], x, y) for n in "ABCD"]
    assert alone == sorted(alone)
    ab, abc, abd = (_np_mae(_np_soup(list(s)), x, y) for s in ("AB", "ABC", "ABD"))
    assert ab < alone[0] and abc > ab and abd < ab

    xt = torch.tensor(x, dtype=torch.float32)

    def score(model: nn.Module) -> float:
        pred = model(xt).detach().numpy().astype(np.float64)
        return float(np.abs(pred - y).mean())

    template = TinyLinear()
    steps = {"A": 7, "B": 1, "C": 2, "D": 3}
    soup = greedy_soup(template, ((n, _state(MEMBERS[n], steps[n])) for n in "ABCD"), score)

    assert soup.members == ("A", "B", "D")
    accepted = [(t, ok) for t, _, ok in soup.tried]
    assert accepted == [("A", True), ("B", True), ("C", False), ("D", True)]
    np.testing.assert_array_equal(soup.state["w"].numpy(), _np_soup(["A", "B", "D"]))
    assert int(soup.state["steps"]) == 7  # integer buffers: the first member's
    assert soup.val_mae == pytest.approx(abd, rel=1e-5)
    # the template is left holding the final soup
    assert torch.equal(template.w.detach(), soup.state["w"])


def test_a_soup_of_one_is_the_best_member_and_never_accepts_a_tie() -> None:
    soup = greedy_soup(
        TinyLinear(), [("A", _state(MEMBERS["A"], 1)), ("A2", _state(MEMBERS["A"], 2))], lambda m: 1
    )
    assert soup.members == ("A",) and soup.tried[1] == ("A2", 1.0, False)
    with pytest.raises(InputError, match="at least one candidate"):
        greedy_soup(TinyLinear(), [], lambda m: 0.0)


def test_average_states_matches_numpy_per_dtype() -> None:
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    halfs = [rng.normal(size=5).astype(np.float16) for _ in range(3)]
    shared = rng.normal(size=6).astype(np.float32)  # e.g. target statistics: equal everywhere
    states = [
        {
            "w": torch.from_numpy(w),
            "h": torch.from_numpy(h),
            "stats": torch.from_numpy(shared.copy()),
            "num_batches_tracked": torch.tensor(10 * (i + 1)),
            "mask": torch.tensor([i == 0, True]),
        }
        for i, (w, h) in enumerate(zip(weights, halfs, strict=True))
    ]
    out = average_states(states)
    ref = np.mean(np.stack(weights).astype(np.float64), 0).astype(np.float32)
    np.testing.assert_array_equal(out["w"].numpy(), ref)
    np.testing.assert_array_equal(
        out["h"].numpy(), np.mean(np.stack(halfs).astype(np.float64), 0).astype(np.float16)
    )
    assert out["h"].dtype == torch.float16
    np.testing.assert_array_equal(out["stats"].numpy(), shared)  # bit-identical, not re-rounded
    assert int(out["num_batches_tracked"]) == 10 and out["mask"].tolist() == [True, True]
    assert out["w"].data_ptr() != states[0]["w"].data_ptr()  # new tensors, not the first's

    wider = {**states[1], "w": torch.zeros(3, 5)}
    with pytest.raises(InputError, match="different architectures"):
        average_states([states[0], wider])


# -- the sweep's students: real checkpoints of a tiny store --------------------------------------


@dataclasses.dataclass(frozen=True)
class Trials:
    """Checkpoints of five students and what the sweep would have collected about them."""

    root: Path
    reader: WindowReader
    rows: tuple[TrialRow, ...]


# trial -> (model, kwargs, noise on the weights, the validation MAE Tune "reported")
SPECS: dict[str, tuple[str, dict[str, Any], float, float]] = {
    "lin1": ("linear", {}, 0.3, 1.0),
    "mlp": ("mlp", {"embed_dim": 8, "node_dim": 4, "num_layers": 1}, 0.0, 1.1),
    "lin2": ("linear", {}, 0.35, 1.2),
    "pernode": ("linear", {"per_node_weights": True}, 0.3, 1.3),
    "lin3": ("linear", {}, 3.0, 1.4),
}
BATCH = 64


def _trial(root: Path, store_path: Path, trial: str, seed: int) -> TrialRow:
    key, kwargs, noise, val_mae = SPECS[trial]
    cfg = load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store_path))}",
            f"student.model={key}",
            f"student.kwargs={json.dumps(kwargs)}",
            "run.name=agg",
        ],
    )
    store = open_store(store_path)
    reader = build_reader(cfg, store)
    torch.manual_seed(seed)
    model = build_model(cfg.student, reader, store)
    if key == "linear":
        # near the per-node mean forecast plus noise: averaging members cancels some of it
        net: Any = model.network
        with torch.no_grad():
            net.weight.normal_(0.0, noise / 24)
            net.bias.zero_()
    info = save_checkpoint(
        root / "tune" / trial / "checkpoint_000001",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": val_mae},
        state=TrainState(epoch=1),
        role=ROLE,
    )
    test = predict_metrics(model, reader, "test", BATCH)
    return TrialRow(
        trial=trial,
        params=model.num_params(),
        val_mae=val_mae,
        test_mae=test.mae,
        test_rmse=test.rmse,
        test_mape=test.mape,
        epochs=2,
        best_epoch=2,
        model=key,
        checkpoint=info.path,
    )


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> Trials:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sweep")
    store_path = root / "tiny.zarr"
    random_store(store_path, steps=300, nodes=4, channels=2, chunk_steps=64)
    rows = tuple(_trial(root, store_path, t, seed) for seed, t in enumerate(SPECS))
    cfg = load_config("demo", [f"data.dataset={json.dumps(str(store_path))}"])
    return Trials(root, build_reader(cfg, open_store(store_path)), rows)


def _np_split(reader: WindowReader, split: str) -> Any:
    return reader.batch(list(reader.windows(split)))


def _np_forecast(model: nn.Module, batch: Any) -> np.ndarray:
    with torch.no_grad():
        return model(batch.x, batch.time_of_day, batch.day_of_week).numpy().astype(np.float64)


def _np_masked_mae(pred: np.ndarray, batch: Any) -> float:
    m = batch.mask.numpy()
    return float(np.abs(pred - batch.y.numpy().astype(np.float64))[m].mean())


def _members(rows: tuple[TrialRow, ...], names: tuple[str, ...]) -> list[Forecaster]:
    by_name = {r.trial: r for r in rows}
    return [by_name[n].load()[0] for n in names]


def test_ensemble_forecast_is_the_numpy_mean_of_its_members(trials: Trials) -> None:
    models = _members(trials.rows, ("lin1", "mlp", "lin2"))
    batch = _np_split(trials.reader, "val")
    want = np.mean(np.stack([_np_forecast(m, batch) for m in models]), 0)
    ensemble = MeanEnsemble(models).eval()
    np.testing.assert_allclose(_np_forecast(ensemble, batch), want, rtol=1e-6, atol=1e-5)
    assert ensemble.num_params() == sum(m.num_params() for m in models)
    with pytest.raises(InputError, match="sum to 1"):
        MeanEnsemble(models, [0.5, 0.5, 0.5])


def test_architecture_tells_apart_keys_and_kwargs(trials: Trials) -> None:
    lin1, lin2, pernode, mlp = _members(trials.rows, ("lin1", "lin2", "pernode", "mlp"))
    assert architecture(lin1) == architecture(lin2)
    assert architecture(lin1) != architecture(pernode)  # same key, other kwargs and shapes
    assert architecture(lin1) != architecture(mlp)


def _run(trials: Trials, root: Location) -> tuple[Aggregates, SweepLayout, list[str]]:
    layout = SweepLayout(root)
    lines: list[str] = []
    # shuffled on purpose: aggregate ranks the rows itself
    rows = sorted(trials.rows, key=lambda r: r.trial)
    return aggregate(rows, trials.reader, BATCH, layout, k=3, echo=lines.append), layout, lines


def _check_aggregates(trials: Trials, agg: Aggregates, layout: SweepLayout) -> None:
    reader, rows = trials.reader, trials.rows
    assert agg.best.trial == "lin1"
    # (c) the soup only ever considers the best trial's architecture
    assert agg.soup_excluded == ("mlp", "pernode")
    assert [t for t, _, _ in agg.soup_tried] == ["lin1", "lin2", "lin3"]
    assert agg.soup.members == ("lin1", "lin2")  # lin3's noise is ten times the others'
    assert agg.soup.params == rows[0].params and agg.soup.model == "linear"

    # (d) the exported soup is a student checkpoint holding exactly the NumPy average
    model, info = load_forecaster(layout.soup, role=ROLE)
    members = [m.state_dict() for m in _members(rows, agg.soup.members)]
    for name, tensor in model.state_dict().items():
        ref = np.mean(np.stack([s[name].numpy() for s in members]).astype(np.float64), 0)
        np.testing.assert_array_equal(tensor.numpy(), ref.astype(np.float32))
    assert all(torch.equal(t, average_states(members)[n]) for n, t in model.state_dict().items())
    assert info.val_mae == pytest.approx(agg.soup.val_mae, rel=1e-12)
    assert read_config(layout.soup / "config.yaml") == info.config
    meta = read_json(layout.soup / "metrics.json")
    assert meta["members"] == ["lin1", "lin2"] and meta["test"]["mae"] == agg.soup.test_mae

    # metrics against a NumPy masked MAE of the whole split
    val, test = _np_split(reader, "val"), _np_split(reader, "test")
    assert agg.soup.val_mae == pytest.approx(_np_masked_mae(_np_forecast(model, val), val))
    assert agg.soup.test_mae == pytest.approx(_np_masked_mae(_np_forecast(model, test), test))
    assert agg.soup.beats_best == (agg.soup.test_mae < agg.best.test_mae)

    # (b) the ensemble: the 3 best trials of any architecture, mean forecast in original units
    assert agg.ensemble.members == ("lin1", "mlp", "lin2") and agg.ensemble.model == "linear+mlp"
    ens = _members(rows, agg.ensemble.members)
    assert agg.ensemble.params == sum(m.num_params() for m in ens)
    for split, batch, got in (
        ("val", val, agg.ensemble.val_mae),
        ("test", test, agg.ensemble.test_mae),
    ):
        mean = np.mean(np.stack([_np_forecast(m, batch) for m in ens]), 0)
        assert got == pytest.approx(_np_masked_mae(mean, batch), rel=1e-6), split
    assert agg.ensemble.beats_best == (agg.ensemble.test_mae < agg.best.test_mae)
    loaded = load_ensemble(layout.ensemble)
    np.testing.assert_allclose(
        _np_forecast(loaded, test), _np_forecast(MeanEnsemble(ens), test), rtol=0, atol=0
    )

    # leaderboard rows: the trials' columns that apply
    soup_row, ens_row = agg.rows(layout.root)
    trial_cols = set(rows[0].record(location(trials.root)))
    assert set(soup_row) - trial_cols == {"members"} and soup_row["trial"] == "soup"
    assert ens_row["trial"] == "ensemble" and ens_row["members"] == "lin1 mlp lin2"
    summary = agg.summary(layout.root)
    json.dumps(summary, allow_nan=False)
    assert summary["soup"]["tried"][2] == {
        "trial": "lin3",
        "val_mae": agg.soup_tried[2][1],
        "accepted": False,
    }


def test_aggregate_builds_evaluates_and_exports_both(
    trials: Trials, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = location(trials.root)  # the trials' checkpoints lie in its tune/, as in a sweep
    agg, layout, lines = _run(trials, root)
    _check_aggregates(trials, agg, layout)
    assert agg.soup.record(root)["checkpoint"] == "soup"
    # members inside the sweep's run are recorded relative to the sweep folder
    manifest = read_json(layout.ensemble / "manifest.json")
    refs = [m["checkpoint"] for m in manifest["members"]]
    assert refs == [f"tune/{t}/checkpoint_000001" for t in ("lin1", "mlp", "lin2")]
    assert [m["weight"] for m in manifest["members"]] == pytest.approx([1 / 3] * 3)
    assert len(lines) == 2 and lines[0].startswith("soup: 2 of 3 trials of 'linear'")

    # `stkd evaluate` reads the soup like any student checkpoint
    report = evaluate_checkpoint(layout.soup, role=ROLE, baselines=False, batch_size=BATCH)
    assert report.model.mae == pytest.approx(agg.soup.test_mae, rel=1e-12)

    # exporting again replaces both whole, leaving no temporary folders behind
    again, _, _ = _run(trials, root)
    assert again.soup == agg.soup and again.ensemble == agg.ensemble
    assert [p.name for p in trials.root.iterdir() if p.name.startswith(".")] == []


def test_aggregate_exports_to_an_object_store(trials: Trials) -> None:
    root = location(f"memory://stkd-agg-{uuid.uuid4().hex[:8]}/runs/r/sweep")
    agg, layout, _ = _run(trials, root)
    _check_aggregates(trials, agg, layout)  # loads the soup and the ensemble back from there


def test_aggregate_refuses_nothing_to_aggregate(trials: Trials, tmp_path: Path) -> None:
    layout = SweepLayout(location(tmp_path))
    with pytest.raises(InputError, match="no trials"):
        aggregate([], trials.reader, BATCH, layout)
    with pytest.raises(InputError, match=">= 1"):
        aggregate(trials.rows, trials.reader, BATCH, layout, k=0)
