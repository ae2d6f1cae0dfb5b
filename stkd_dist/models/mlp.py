"""``mlp`` student: STID.

Shao et al., "Spatial-Temporal Identity: A Simple yet Effective Baseline for Multivariate Time Series
Forecasting", CIKM 2022. Each node's ``L × C_in`` history is flattened and embedded linearly, then
concatenated with a learned node identity, a time-of-day slot embedding and a day-of-week embedding
(of the last input step), passed through residual MLP layers and a linear head to ``H × C_out``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.models.base import NetOutput, Network
from stkd_dist.models.features import DAY_SLOTS, TimeEmbedding, check_inputs, clean_inputs
from stkd_dist.models.registry import STUDENTS


class ResidualMLP(nn.Module):
    """``x + W2 · dropout(relu(W1 · x))``."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(torch.relu(self.fc1(x))))


@STUDENTS.register("mlp")
class STIDNet(Network):
    """STID student (see the module docstring). The graph is ignored.

    The defaults keep it below a tenth of the default ``stgnn`` teacher's parameters for ~200 nodes.

    Args:
        dims: data sizes.
        adjacency: ignored.
        embed_dim: size of the history embedding.
        node_dim: size of the node identity embedding (0 disables it).
        tod_dim: size of the time-of-day embedding (0 disables it).
        dow_dim: size of the day-of-week embedding (0 disables it).
        num_layers: residual MLP layers.
        slots: time-of-day slots per day.
        dropout: dropout inside the residual layers.
        spread: also output a log-variance.
    """

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        embed_dim: int = 32,
        node_dim: int = 16,
        tod_dim: int = 8,
        dow_dim: int = 8,
        num_layers: int = 2,
        slots: int = DAY_SLOTS,
        dropout: float = 0.1,
        spread: bool = False,
    ) -> None:
        super().__init__(dims, spread)
        del adjacency
        if embed_dim <= 0 or num_layers < 0 or node_dim < 0:
            raise ValueError("embed_dim must be positive, node_dim and num_layers non-negative")
        self.history = nn.Linear(dims.input_steps * dims.in_channels, embed_dim)
        self.node_emb = nn.Parameter(torch.empty(dims.nodes, node_dim)) if node_dim else None
        if self.node_emb is not None:
            nn.init.xavier_uniform_(self.node_emb)
        self.time_emb = TimeEmbedding(tod_dim, dow_dim, slots)
        self.learns_weekdays = dow_dim > 0
        hidden = embed_dim + node_dim + self.time_emb.dim
        self.encoder = nn.Sequential(*(ResidualMLP(hidden, dropout) for _ in range(num_layers)))
        self.head = nn.Linear(hidden, self.head_size)

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> NetOutput:
        check_inputs(x, time_of_day, day_of_week, self.dims)
        b, steps, n, c = x.shape
        hist = clean_inputs(x).permute(0, 2, 1, 3).reshape(b, n, steps * c)  # [batch, node, L*C_in]
        parts = [self.history(hist)]  # [batch, node, embed_dim]
        if self.node_emb is not None:
            parts.append(self.node_emb.unsqueeze(0).expand(b, -1, -1))  # [batch, node, node_dim]
        # the last input step's slot: STID's "temporal identity"
        t = self.time_emb(time_of_day[:, -1], day_of_week[:, -1])  # [batch, tod_dim + dow_dim]
        parts.append(t.unsqueeze(1).expand(-1, n, -1))
        hidden = self.encoder(torch.cat(parts, dim=-1))  # [batch, node, hidden]
        return self.split_head(self.head(hidden), hidden)
