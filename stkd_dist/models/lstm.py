"""Per-node encoder–decoder LSTMs: the ``lstm`` teacher and the ``lstm_small`` student.

Weights are shared across nodes: nodes are folded into the batch, so each node's series is one
sequence. The encoder reads the ``L`` input steps (channels plus time of day and day of week); the
decoder unrolls ``H`` steps from the encoder state, fed with its own previous prediction (zeros at
the first step). The graph is ignored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.models.base import NetOutput, Network
from stkd_dist.models.features import TIME_CHANNELS, check_inputs, clean_inputs, with_time_channels
from stkd_dist.models.registry import STUDENTS, TEACHERS


@TEACHERS.register("lstm")
class LSTMNet(Network):
    """Encoder–decoder LSTM applied to every node independently (see the module docstring).

    Args:
        dims: data sizes.
        adjacency: ignored.
        hidden: LSTM hidden size.
        layers: stacked LSTM layers (encoder and decoder alike).
        dropout: dropout between stacked layers (needs ``layers > 1``).
        spread: also output a log-variance.
    """

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.0,
        spread: bool = False,
    ) -> None:
        super().__init__(dims, spread)
        del adjacency
        if hidden <= 0 or layers <= 0:
            raise ValueError("hidden and layers must be positive")
        between = dropout if layers > 1 else 0.0
        self.encoder = nn.LSTM(
            dims.in_channels + TIME_CHANNELS, hidden, layers, batch_first=True, dropout=between
        )
        self.decoder = nn.LSTM(dims.out_channels, hidden, layers, batch_first=True, dropout=between)
        self.project = nn.Linear(hidden, dims.out_channels * (2 if self.spread else 1))

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> NetOutput:
        check_inputs(x, time_of_day, day_of_week, self.dims)
        b, steps, n, _ = x.shape
        c_out = self.dims.out_channels
        seq = with_time_channels(clean_inputs(x), time_of_day, day_of_week)  # [b, L, node, C+2]
        seq = seq.permute(0, 2, 1, 3).reshape(b * n, steps, -1)  # nodes folded into the batch
        _, state = self.encoder(seq)  # h, c: [layers, b*node, hidden]
        hidden = state[0][-1].reshape(b, n, -1)  # [batch, node, hidden]
        prev = seq.new_zeros(b * n, 1, c_out)
        outs = []
        for _ in range(self.dims.horizon):
            dec, state = self.decoder(prev, state)  # dec: [b*node, 1, hidden]
            step = self.project(dec)  # [b*node, 1, C_out * (2 if spread)]
            outs.append(step)
            prev = step[..., :c_out]  # feed the mean back
        out = torch.cat(outs, dim=1)  # [b*node, H, C_out*k]
        k = 2 if self.spread else 1
        # reorder to the head layout of split_head: k blocks of [H, C_out]
        flat = out.reshape(b, n, self.dims.horizon, k, c_out).permute(0, 1, 3, 2, 4)
        return self.split_head(flat.reshape(b, n, -1), hidden)


@STUDENTS.register("lstm_small")
def lstm_small(
    dims: DataDims,
    adjacency: np.ndarray | None = None,
    hidden: int = 16,
    layers: int = 1,
    dropout: float = 0.0,
    spread: bool = False,
) -> LSTMNet:
    """A small per-node LSTM student (one layer of 16 units by default)."""
    return LSTMNet(dims, adjacency, hidden=hidden, layers=layers, dropout=dropout, spread=spread)
