"""``linear`` student: the floor every other model must beat."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.models.base import NetOutput, Network
from stkd_dist.models.features import check_inputs, clean_inputs
from stkd_dist.models.registry import STUDENTS


@STUDENTS.register("linear")
class LinearNet(Network):
    """Per-node linear map from the ``L × C_in`` history to ``H × C_out``.

    By default the weight matrix is shared by all nodes and each node has its own bias
    (``per_node_weights=False``: ``L·C_in·H·C_out + N·H·C_out`` parameters); with
    ``per_node_weights=True`` every node has its own weight matrix as well. The graph is ignored.
    The hidden representation used for feature matching is the flat output itself.

    Args:
        dims: data sizes.
        adjacency: ignored.
        per_node_weights: one weight matrix per node instead of a shared one.
        spread: also output a log-variance.
    """

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        per_node_weights: bool = False,
        spread: bool = False,
    ) -> None:
        super().__init__(dims, spread)
        del adjacency  # a per-node model does not use the graph
        self.per_node_weights = bool(per_node_weights)
        fan_in = dims.input_steps * dims.in_channels
        n_w = dims.nodes if self.per_node_weights else 1
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(n_w, fan_in, self.head_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(dims.nodes, self.head_size))

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> NetOutput:
        check_inputs(x, time_of_day, day_of_week, self.dims)
        b, steps, n, c = x.shape
        hist = clean_inputs(x).permute(0, 2, 1, 3).reshape(b, n, steps * c)  # [batch, node, L*C_in]
        flat = torch.einsum("bnf,nfo->bno", hist, self.weight.expand(n, -1, -1)) + self.bias
        return self.split_head(flat, flat)  # flat: [batch, node, head_size]
