"""Every registered model: shapes, gradients, specs, de-normalisation, spread, sizes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from stkd_dist.data.batch import DataDims, WindowBatch
from stkd_dist.errors import ConfigError, InputError
from stkd_dist.models import MODELS, Forecaster, build_forecaster

from .conftest import KEYS, SMALL_KWARGS, make_inputs


def _adjacency(nodes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    adj = (rng.random((nodes, nodes)) < 0.5).astype(np.float32)
    np.fill_diagonal(adj, 1.0)
    return adj


def _model(key: str, dims: DataDims, **extra: object) -> Forecaster:
    rng = np.random.default_rng(1)
    mean = rng.normal(50, 5, size=(dims.nodes, dims.out_channels))
    std = rng.uniform(2, 4, size=(dims.nodes, dims.out_channels))
    return build_forecaster(
        key,
        dims,
        adjacency=_adjacency(dims.nodes),
        target_scale=(mean, std),
        **SMALL_KWARGS[key],
        **extra,
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_all_registered_models_are_covered() -> None:
    assert set(KEYS) == set(MODELS.keys())


@pytest.mark.parametrize("key", KEYS)
def test_output_shape_and_gradients(key: str, dims: DataDims) -> None:
    model = _model(key, dims)
    x, tod, dow = make_inputs(dims)
    y = model(x, tod, dow)
    assert y.shape == (3, dims.horizon, dims.nodes, dims.out_channels)
    assert torch.isfinite(y).all()
    y.sum().backward()
    for name, p in model.network.named_parameters():
        assert p.grad is not None, f"{key}: no gradient reaches {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.network.parameters())


@pytest.mark.parametrize("key", KEYS)
def test_param_count(key: str, dims: DataDims) -> None:
    model = _model(key, dims)
    n = model.num_params()
    print(f"{key}: {n} trainable parameters at {dims}")
    assert n == sum(p.numel() for p in model.network.parameters())
    # the de-normalisation statistics are buffers, not parameters
    assert "target_mean" in dict(model.named_buffers())
    assert n > 0


@pytest.mark.parametrize("key", KEYS)
def test_spec_round_trip_reproduces_outputs(key: str, dims: DataDims) -> None:
    model = _model(key, dims, spread=True).eval()
    x, tod, dow = make_inputs(dims)
    # a spec survives JSON; the state dict carries weights, target statistics and the graph
    spec = json.loads(json.dumps(model.spec()))
    assert spec["key"] == key and spec["dims"]["nodes"] == dims.nodes
    rebuilt = Forecaster.from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        a, b = model(x, tod, dow, output="spread"), rebuilt(x, tod, dow, output="spread")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert rebuilt.kwargs == model.kwargs and rebuilt.dims == model.dims


@pytest.mark.parametrize("key", KEYS)
def test_denormalisation(key: str, dims: DataDims) -> None:
    model = _model(key, dims, spread=True).eval()
    x, tod, dow = make_inputs(dims)
    with torch.no_grad():
        raw = model.network(x, tod, dow)
        mean, log_var = model.forward_with_spread(x, tod, dow)
    std = model.target_std.numpy()
    mu = model.target_mean.numpy()
    np.testing.assert_allclose(mean.numpy(), raw.mean.numpy() * std + mu, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        log_var.numpy(), raw.log_var.numpy() + 2 * np.log(std), rtol=1e-6, atol=1e-5
    )
    assert torch.equal(model(x, tod, dow), mean)


@pytest.mark.parametrize("key", KEYS)
def test_outputs_of_forward(key: str, dims: DataDims) -> None:
    model = _model(key, dims).eval()
    x, tod, dow = make_inputs(dims)
    batch = WindowBatch(
        index=torch.arange(3),
        x=x,
        y=torch.zeros(3, dims.horizon, dims.nodes, dims.out_channels),
        mask=torch.ones(3, dims.horizon, dims.nodes, dims.out_channels, dtype=torch.bool),
        x_mask=torch.ones_like(x, dtype=torch.bool),
        time_of_day=tod,
        day_of_week=dow,
        valid=torch.ones(3, dtype=torch.bool),
    )
    with torch.no_grad():
        mean, hidden = model(batch.x, batch.time_of_day, batch.day_of_week, output="features")
        full = model(x, tod, dow, output="all")
    assert torch.equal(mean, full.mean) and full.log_var is None
    assert hidden.shape[:2] == (3, dims.nodes) and hidden.dim() == 3
    with pytest.raises(ConfigError, match="without spread"):
        model(x, tod, dow, output="spread")
    with pytest.raises(ConfigError, match="must be one of"):
        model(x, tod, dow, output="median")


@pytest.mark.parametrize("key", KEYS)
def test_nan_inputs_equal_zero_filled(key: str, dims: DataDims) -> None:
    model = _model(key, dims).eval()
    x, tod, dow = make_inputs(dims)
    missing = torch.rand(x.shape) < 0.3
    with torch.no_grad():
        zero = model(x.masked_fill(missing, 0.0), tod, dow)
        nan = model(x.masked_fill(missing, float("nan")), tod, dow)
    assert torch.isfinite(nan).all()
    assert torch.equal(zero, nan)


@pytest.mark.parametrize("key", KEYS)
def test_wrong_input_shape_raises(key: str, dims: DataDims) -> None:
    model = _model(key, dims)
    x, tod, dow = make_inputs(dims)
    with pytest.raises(InputError, match="x"):
        model(x[:, :-1], tod, dow)
    with pytest.raises(InputError, match="time_of_day"):
        model(x, tod[:, :-1], dow)


def test_bad_target_scale_raises(dims: DataDims) -> None:
    with pytest.raises(ConfigError, match="target_std"):
        build_forecaster("linear", dims, target_scale=(0.0, np.zeros((dims.nodes, 1))))
    with pytest.raises(ConfigError, match="target_mean"):
        build_forecaster("linear", dims, target_scale=(np.zeros((dims.nodes + 1, 1)), 1.0))


def test_linear_per_node_weights_differ_per_node(dims: DataDims) -> None:
    shared = build_forecaster("linear", dims)
    per_node = build_forecaster("linear", dims, per_node_weights=True)
    assert per_node.num_params() > shared.num_params()
    # identical histories on every node: the per-node model still predicts differently per node
    x, tod, dow = make_inputs(dims, batch=1)
    x = x[:, :, :1].expand_as(x).clone()
    with torch.no_grad():
        y = per_node(x, tod, dow)
    assert not torch.allclose(y[:, :, 0], y[:, :, 1])


def test_default_student_is_a_tenth_of_the_teacher_and_faster() -> None:
    torch.set_num_threads(1)
    dims = DataDims(nodes=207, input_steps=12, horizon=12, in_channels=1, out_channels=1)
    teacher = build_forecaster("stgnn", dims, adjacency=_adjacency(207)).eval()
    student = build_forecaster("mlp", dims).eval()
    ratio = student.num_params() / teacher.num_params()
    print(f"mlp {student.num_params()} / stgnn {teacher.num_params()} = {ratio:.3f}")
    assert ratio <= 0.1

    def seconds(model: Forecaster) -> float:
        x, tod, dow = make_inputs(dims, batch=2)
        with torch.no_grad():
            model(x, tod, dow)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(x, tod, dow)
                times.append(time.perf_counter() - t0)
        return min(times)

    speedup = seconds(teacher) / seconds(student)
    print(f"mlp is {speedup:.1f}x faster than stgnn on a batch of 2 (CPU)")
    assert speedup >= 5
