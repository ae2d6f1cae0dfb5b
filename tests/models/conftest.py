"""Small inputs shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from stkd_dist.data.batch import DataDims

#: small hyper-parameters per key so every test stays fast
_GRAPH_WAVENET = {
    "residual_channels": 8,
    "dilation_channels": 8,
    "skip_channels": 16,
    "end_channels": 16,
    "blocks": 2,
    "layers_per_block": 2,
}
SMALL_KWARGS: dict[str, dict] = {
    "stgnn": _GRAPH_WAVENET,
    "stgnn_inductive": _GRAPH_WAVENET,
    "staeformer": {
        "input_dim": 4,
        "tod_dim": 4,
        "dow_dim": 2,
        "adaptive_dim": 2,
        "ff_dim": 8,
        "heads": 2,
        "temporal_layers": 1,
        "spatial_layers": 1,
    },
    "lstm": {"hidden": 8},
    "lstm_small": {"hidden": 4},
    "mlp": {"embed_dim": 8, "node_dim": 4, "tod_dim": 4, "dow_dim": 2},
    "linear": {},
}
KEYS = sorted(SMALL_KWARGS)


def make_inputs(
    dims: DataDims, batch: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, time_of_day, day_of_week)`` for ``dims``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims.input_steps, dims.nodes, dims.in_channels, generator=g)
    tod = torch.rand(batch, dims.input_steps, generator=g)
    dow = torch.randint(0, 7, (batch, dims.input_steps), generator=g)
    return x, tod, dow


@pytest.fixture
def dims() -> DataDims:
    return DataDims(nodes=5, input_steps=6, horizon=4, in_channels=2, out_channels=1)
