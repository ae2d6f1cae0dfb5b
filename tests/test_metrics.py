"""Masked metrics against a NumPy reference, and their DDP all-reduce over two gloo processes."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stkd_dist.errors import InputError
from stkd_dist.metrics import MetricAccumulator, MetricResult, evaluate_metrics


def _data(seed: int, batch: int = 7, horizon: int = 4, nodes: int = 5, channels: int = 2):
    rng = np.random.default_rng(seed)
    shape = (batch, horizon, nodes, channels)
    target = rng.normal(10, 5, size=shape)
    target[rng.random(shape) < 0.15] = 0.0  # zero targets: left out of MAPE
    target[rng.random(shape) < 0.05] = 5e-4  # near-zero targets: below the default eps
    pred = target + rng.normal(0, 2, size=shape)
    mask = rng.random(shape) > 0.2
    target_obs = np.where(mask, target, np.nan)  # unobserved entries hold garbage
    return pred, target_obs, mask


def _reference(pred, target, mask, eps=1e-3) -> dict[str, np.ndarray | float]:
    """Straightforward NumPy metrics, per horizon step via explicit loops."""
    horizon = pred.shape[1]
    out: dict[str, list[float]] = {"mae_h": [], "rmse_h": [], "mape_h": []}
    all_err, all_pct = [], []
    for h in range(horizon):
        p, y = pred[:, h][mask[:, h]], target[:, h][mask[:, h]]
        err = np.abs(p - y)
        m = np.abs(y) > eps
        pct = err[m] / np.abs(y[m])
        out["mae_h"].append(err.mean())
        out["rmse_h"].append(np.sqrt((err**2).mean()))
        out["mape_h"].append(100 * pct.mean())
        all_err.append(err)
        all_pct.append(pct)
    err, pct = np.concatenate(all_err), np.concatenate(all_pct)
    return {
        **out,
        "mae": err.mean(),
        "rmse": np.sqrt((err**2).mean()),
        "mape": 100 * pct.mean(),
        "count": err.size,
    }


def _assert_matches(result: MetricResult, ref: dict) -> None:
    for k in ("mae", "rmse", "mape"):
        assert getattr(result, k) == pytest.approx(ref[k], rel=1e-12)
    for k in ("mae_h", "rmse_h", "mape_h"):
        np.testing.assert_allclose(getattr(result, k), ref[k], rtol=1e-12)
    assert result.count == ref["count"]


def test_matches_numpy_reference_over_several_batches() -> None:
    pred, target, mask = _data(0)
    acc = MetricAccumulator(horizon=4)
    for lo, hi in ((0, 2), (2, 3), (3, 7)):  # uneven batches: sums, not averages of averages
        acc.update(
            torch.from_numpy(pred[lo:hi]).float(),
            torch.from_numpy(target[lo:hi]).float(),
            torch.from_numpy(mask[lo:hi]),
        )
    # float32 inputs, float64 sums: compare with the reference on the same float32 values
    ref = _reference(
        pred.astype(np.float32).astype(np.float64),
        target.astype(np.float32).astype(np.float64),
        mask,
    )
    _assert_matches(acc.compute(), ref)


def test_mape_eps_is_configurable() -> None:
    pred, target, mask = _data(1)
    tensors = [torch.from_numpy(a) for a in (pred, target, mask)]
    loose = evaluate_metrics(*tensors, mape_eps=0.0)  # keeps the 5e-4 targets, drops exact zeros
    strict = evaluate_metrics(*tensors, mape_eps=1e-3)
    assert math.isfinite(loose.mape)
    assert strict.mape < loose.mape  # the near-zero targets blow the percentage up
    assert loose.mae == strict.mae  # MAE / RMSE do not depend on the MAPE threshold
    _assert_matches(strict, _reference(pred, target, mask, eps=1e-3))
    _assert_matches(loose, _reference(pred, target, mask, eps=0.0))


def test_nothing_observed_gives_nan_and_json_null() -> None:
    acc = MetricAccumulator(horizon=2)
    z = torch.zeros(1, 2, 3, 1)
    acc.update(z, z, torch.zeros_like(z, dtype=torch.bool))
    res = acc.compute()
    assert math.isnan(res.mae) and math.isnan(res.mape_h[1]) and res.count == 0
    d = json.loads(json.dumps(res.to_json()))
    assert d["mae"] is None and d["rmse_h"] == [None, None]
    back = MetricResult.from_json(d)
    assert math.isnan(back.rmse)


def test_json_round_trip() -> None:
    pred, target, mask = _data(2)
    res = evaluate_metrics(*(torch.from_numpy(a) for a in (pred, target, mask)))
    assert MetricResult.from_json(json.loads(json.dumps(res.to_json()))) == res


def test_bad_shapes_raise() -> None:
    acc = MetricAccumulator(horizon=3)
    with pytest.raises(InputError, match="H=3"):
        acc.update(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.ones(2, 4, 1, dtype=bool))
    with pytest.raises(InputError, match="horizon"):
        MetricAccumulator(horizon=0)


def test_all_reduce_without_process_group_is_local() -> None:
    pred, target, mask = _data(3)
    acc = MetricAccumulator(4)
    acc.update(*(torch.from_numpy(a) for a in (pred, target, mask)))
    before = acc.compute()
    assert acc.all_reduce().compute() == before
    with pytest.raises(RuntimeError, match="twice"):
        acc.all_reduce()
    with pytest.raises(RuntimeError, match="after all_reduce"):
        acc.update(*(torch.from_numpy(a) for a in (pred, target, mask)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rank r evaluates rows SHARDS[r] of the data: unequal sizes on purpose.
SHARDS = ((0, 2), (2, 9))


def _worker(rank: int, port: int, result_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SHARDS)
    )
    try:
        pred, target, mask = _data(4, batch=9)
        lo, hi = SHARDS[rank]
        acc = MetricAccumulator(horizon=4)
        acc.update(*(torch.from_numpy(a[lo:hi]) for a in (pred, target, mask)))
        acc.all_reduce()  # both ranks call it: a collective
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(acc.compute().to_json(), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_process_all_reduce_equals_metric_on_concatenated_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # spawned processes unpickle _worker by module name: let them import this test module
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    out = str(tmp_path / "metrics.json")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=len(SHARDS), join=True)
    pred, target, mask = _data(4, batch=9)
    ref = _reference(pred, target, mask)
    counts = [mask[lo:hi].sum() for lo, hi in SHARDS]
    assert counts[0] != counts[1]
    per_rank_means = [
        _reference(pred[lo:hi], target[lo:hi], mask[lo:hi])["mae"] for lo, hi in SHARDS
    ]
    assert np.mean(per_rank_means) != pytest.approx(ref["mae"], rel=1e-6)  # naive average differs
    for rank in range(len(SHARDS)):
        with open(f"{out}.{rank}") as f:
            _assert_matches(MetricResult.from_json(json.load(f)), ref)
