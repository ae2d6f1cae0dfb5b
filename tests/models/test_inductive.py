"""``stgnn_inductive``: a graph teacher without per-node parameters, whose weights forecast
another graph (transfer), against properties that only such a network has."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models import Forecaster, build_forecaster

from .conftest import SMALL_KWARGS, make_inputs


def _graph(nodes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(adjacency, target mean, target std)`` of a random graph."""
    rng = np.random.default_rng(seed)
    adj = (rng.random((nodes, nodes)) < 0.4) * rng.uniform(0.1, 1, (nodes, nodes))
    np.fill_diagonal(adj, 1.0)
    return adj.astype(np.float32), rng.normal(50, 5, (nodes, 1)), rng.uniform(2, 4, (nodes, 1))


def _model(key: str, dims: DataDims, seed: int = 0) -> Forecaster:
    adj, mean, std = _graph(dims.nodes, seed)
    torch.manual_seed(seed)
    model = build_forecaster(
        key, dims, adjacency=adj, target_scale=(mean, std), **SMALL_KWARGS[key]
    )
    return model.eval()


def _shapes(model: Forecaster) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in model.network.named_parameters()}


def test_no_parameter_depends_on_the_node_count(dims: DataDims) -> None:
    small, big = dims, dataclasses.replace(dims, nodes=13)
    assert _shapes(_model("stgnn_inductive", small)) == _shapes(_model("stgnn_inductive", big))
    # the transductive Graph WaveNet learns node embeddings: its shapes follow the graph
    assert _shapes(_model("stgnn", small)) != _shapes(_model("stgnn", big))


def test_renumbering_the_nodes_renumbers_the_forecast(dims: DataDims) -> None:
    model = _model("stgnn_inductive", dims)
    adj, mean, std = _graph(dims.nodes, 0)
    perm = np.random.default_rng(3).permutation(dims.nodes)
    # the same weights on the same graph with its nodes in another order
    moved = model.rebound(dims.nodes, adj[np.ix_(perm, perm)], (mean[perm], std[perm]))
    x, tod, dow = make_inputs(dims)
    with torch.no_grad():
        y = model(x, tod, dow)  # [batch, H, node, C_out]
        y_moved = moved(x[:, :, perm], tod, dow)
    torch.testing.assert_close(y_moved, y[:, :, perm], rtol=1e-5, atol=1e-4)


def test_rebound_weights_forecast_a_graph_of_another_size(dims: DataDims) -> None:
    model = _model("stgnn_inductive", dims)
    adj, mean, std = _graph(11, 7)
    other = model.rebound(11, adj, (mean, std))
    ours, theirs = model.network.state_dict(), other.network.state_dict()
    for k, v in ours.items():
        if k == "adjacency":
            assert torch.equal(theirs[k], torch.from_numpy(adj))  # the other graph's
        else:
            assert torch.equal(theirs[k], v), k  # every weight and running statistic: ours
    torch.testing.assert_close(other.target_mean, torch.as_tensor(mean, dtype=torch.float32))
    x, tod, dow = make_inputs(dataclasses.replace(dims, nodes=11))
    with torch.no_grad():
        y = other(x, tod, dow)
    assert y.shape == (3, dims.horizon, 11, dims.out_channels) and torch.isfinite(y).all()
    assert not other.training and other.spec()["dims"]["nodes"] == 11


def test_only_a_transferable_model_is_rebound_and_says_so(dims: DataDims) -> None:
    assert _model("stgnn_inductive", dims).spec()["transferable"] is True
    for key in ("stgnn", "staeformer", "mlp"):
        model = _model(key, dims)
        assert model.spec()["transferable"] is False
        adj, mean, std = _graph(dims.nodes, 1)
        with pytest.raises(ConfigError, match="learns per-node parameters") as e:
            model.rebound(dims.nodes, adj, (mean, std))
        assert e.value.where == "teacher.model"
    # a spec written before the flag existed still rebuilds (the flag is derived, not read)
    spec = _model("stgnn_inductive", dims).spec()
    del spec["transferable"]
    assert Forecaster.from_spec(spec).transferable
