"""STAEformer: a hand-checked tiny case, attention by hand, and what attends to what."""

from __future__ import annotations

import math

import pytest
import torch

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models import build_forecaster
from stkd_dist.models.staeformer import Attention

from .conftest import SMALL_KWARGS, make_inputs


def test_attention_by_hand() -> None:
    # identity projections, one head: out_i = sum_j softmax_j(x_i . x_j / sqrt(2)) x_j
    attn = Attention(2, heads=1)
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v, attn.out):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, tokens=2, dim=2]
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)  # 0.6698
    expected = torch.tensor([[[w, 1 - w], [1 - w, w]]])
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_tiny_case_by_hand() -> None:
    """2 nodes, 2 input steps, 1 output step; tokens = [input embedding, adaptive embedding].

    With every attention and feed-forward weight zero, each layer is ``LN(LN(x))``: a token
    ``[a, c]`` becomes ``sign(a - c) * [1, -1]`` (to LayerNorm's eps). The head then reads
    ``h · [s_0, -s_0, s_1, -s_1] + b`` per node, with ``s_t`` the sign of step ``t``.
    """
    dims = DataDims(nodes=2, input_steps=2, horizon=1, in_channels=1, out_channels=1)
    kw = dict(input_dim=1, tod_dim=0, dow_dim=0, adaptive_dim=1, ff_dim=1, heads=1, dropout=0.0)
    model = build_forecaster("staeformer", dims, temporal_layers=1, spatial_layers=1, **kw)
    net = model.network
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for ln in (m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)):
            ln.weight.fill_(1.0)
        net.input_proj.weight.fill_(1.0)  # a = x
        net.adaptive.copy_(torch.tensor([[[0.0], [5.0]], [[0.0], [0.0]]]))  # c[t, node]
        net.head.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))  # reads d0 of steps 0, 1
        net.head.bias.fill_(0.5)
    model.eval()
    # node 0: x = (1, -1) vs c = (0, 0): signs (+, -); node 1: x = (1, 2) vs c = (5, 0): (-, +)
    x = torch.tensor([[[1.0, 1.0], [-1.0, 2.0]]]).reshape(1, 2, 2, 1)  # [b, L, node, C]
    tod, dow = torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)
    y = model(x, tod, dow)
    assert y.shape == (1, 1, 2, 1)
    expected = torch.tensor([1 - 2 + 0.5, -1 + 2 + 0.5]).reshape(1, 1, 2, 1)
    assert torch.allclose(y, expected, atol=1e-3)
    _, hidden = model(x, tod, dow, output="features")
    assert hidden.shape == (1, 2, 2)  # [batch, node, D]: tokens averaged over the input steps
    assert torch.allclose(hidden[0, 0], torch.tensor([0.0, 0.0]), atol=1e-3)  # (+) and (-)


def test_spatial_attention_mixes_nodes_and_temporal_only_does_not() -> None:
    dims = DataDims(nodes=4, input_steps=3, horizon=2, in_channels=1, out_channels=1)
    torch.manual_seed(0)
    small = {**SMALL_KWARGS["staeformer"], "dropout": 0.0}
    x, tod, dow = make_inputs(dims)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    for spatial, others_change in ((1, True), (0, False)):
        model = build_forecaster("staeformer", dims, **{**small, "spatial_layers": spatial})
        model.eval()
        with torch.no_grad():
            d = (model(x, tod, dow) - model(x2, tod, dow)).abs().sum(dim=(0, 1, 3))
        assert d[0] > 0
        assert bool((d[1:] > 0).all()) == others_change


def test_width_must_split_into_heads() -> None:
    dims = DataDims(nodes=2, input_steps=2, horizon=1, in_channels=1, out_channels=1)
    with pytest.raises(ConfigError, match="not a multiple of 4 heads"):
        build_forecaster("staeformer", dims, input_dim=3, tod_dim=0, dow_dim=0, adaptive_dim=0)
