"""Graph WaveNet specifics: the graph is used, carried by checkpoints, and validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models import Forecaster, build_forecaster
from stkd_dist.models.stgnn import GraphWaveNet, transition

from .conftest import SMALL_KWARGS, make_inputs

SMALL = SMALL_KWARGS["stgnn"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _ring(n: int) -> np.ndarray:
    adj = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        adj[i, (i + 1) % n] = 1.0
    return adj


def test_transition_is_row_normalised() -> None:
    adj = torch.tensor([[0.0, 2.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = transition(adj)
    assert torch.allclose(p, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("adaptive", [True, False])
def test_adjacency_changes_outputs(dims: DataDims, adaptive: bool) -> None:
    model = build_forecaster("stgnn", dims, adjacency=_ring(dims.nodes), adaptive=adaptive, **SMALL)
    model.eval()
    x, tod, dow = make_inputs(dims)
    with torch.no_grad():
        before = model(x, tod, dow)
        model.network.adjacency.copy_(torch.from_numpy(_ring(dims.nodes).T.copy()))
        after = model(x, tod, dow)
    assert not torch.allclose(before, after)


def test_node_input_reaches_neighbours_only_through_the_graph(dims: DataDims) -> None:
    # without the adaptive adjacency and with an empty graph, nodes do not interact at all
    empty = np.zeros((dims.nodes, dims.nodes), dtype=np.float32)
    model = build_forecaster("stgnn", dims, adjacency=empty, adaptive=False, **SMALL).eval()
    x, tod, dow = make_inputs(dims)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    with torch.no_grad():
        d = (model(x, tod, dow) - model(x2, tod, dow)).abs().sum(dim=(0, 1, 3))
    assert d[0] > 0 and torch.all(d[1:] == 0)
    # with a ring 0→1 the perturbation of node 0 reaches the nodes linked to it
    model.network.adjacency.copy_(torch.from_numpy(_ring(dims.nodes)))
    with torch.no_grad():
        d = (model(x, tod, dow) - model(x2, tod, dow)).abs().sum(dim=(0, 1, 3))
    assert d[1:].sum() > 0


def test_checkpoint_carries_the_adjacency(dims: DataDims) -> None:
    model = build_forecaster("stgnn", dims, adjacency=_ring(dims.nodes), **SMALL).eval()
    state = model.state_dict()
    assert torch.equal(state["network.adjacency"], torch.from_numpy(_ring(dims.nodes)))
    rebuilt = Forecaster.from_spec(model.spec())  # no adjacency given: identity until loaded
    assert torch.equal(rebuilt.network.adjacency, torch.eye(dims.nodes))
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x, tod, dow = make_inputs(dims)
    with torch.no_grad():
        assert torch.equal(model(x, tod, dow), rebuilt(x, tod, dow))


@pytest.mark.parametrize("steps", [3, 12])
def test_inputs_shorter_and_longer_than_the_receptive_field(steps: int) -> None:
    dims = DataDims(nodes=4, input_steps=steps, horizon=2, in_channels=1, out_channels=2)
    net = GraphWaveNet(dims, None, **SMALL)
    assert net.receptive_field == 7  # 1 + 2 blocks * (1 + 2)
    x, tod, dow = make_inputs(dims)
    out = net(x, tod, dow)
    assert out.mean.shape == (3, 2, 4, 2)
    assert out.hidden.shape == (3, 4, SMALL["skip_channels"])


def test_masked_inputs_are_handled(dims: DataDims) -> None:
    model = build_forecaster("stgnn", dims, adjacency=_ring(dims.nodes), **SMALL)
    x, tod, dow = make_inputs(dims)
    x[:, :, 2] = float("nan")  # node 2 never observed in this window
    x[0] = 0.0  # a fully missing window (zero-filled by the batch contract)
    y = model(x, tod, dow)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.network.parameters())


def test_bad_adjacency_raises(dims: DataDims) -> None:
    with pytest.raises(ConfigError, match=r"adjacency: shape \(3, 3\)"):
        build_forecaster("stgnn", dims, adjacency=np.eye(3))
    bad = np.eye(dims.nodes)
    bad[0, 1] = -1
    with pytest.raises(ConfigError, match="non-negative"):
        build_forecaster("stgnn", dims, adjacency=bad)
