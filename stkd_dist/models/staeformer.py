"""``staeformer`` teacher: STAEformer.

Liu, Yang, Jiang, Chen, Song, Zhang, Li, Zhang, "STAEformer: Spatio-Temporal Adaptive Embedding
Makes Vanilla Transformer SOTA for Spatio-Temporal Forecasting", CIKM 2023.

Every input token (one node at one input step) is embedded as the concatenation of

* an input embedding (a linear map of the step's ``C_in`` channels),
* a time-of-day slot embedding and a day-of-week embedding of the step,
* a spatio-temporal adaptive embedding: one learned vector per (input step, node), shared by
  all samples, which lets the model learn each node's typical pattern at each position;

then passes through vanilla post-norm transformer layers along time (each node's ``L`` tokens
attend to each other), then along nodes (the ``N`` tokens of each step attend to each other: the
graph is learned, not given). A linear regression head maps each node's ``L × D`` tokens to its
``H × C_out`` forecast at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models.base import NetOutput, Network
from stkd_dist.models.features import DAY_SLOTS, check_inputs, clean_inputs, time_slot
from stkd_dist.models.registry import TEACHERS


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention over the second-to-last axis.

    ``x: [..., tokens, dim]`` → ``[..., tokens, dim]``: ``W_o · concat_h softmax(Q_h K_hᵀ / √d_h) V_h``.

    Args:
        dim: token size (a multiple of ``heads``).
        heads: attention heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model width {dim} is not a multiple of {heads} heads", "heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(z: torch.Tensor) -> torch.Tensor:  # [..., t, d] -> [..., h, t, dh]
            return z.reshape(*lead, t, h, dh).transpose(-3, -2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [..., h, t, t]
        out = torch.softmax(scores, dim=-1) @ v  # [..., h, t, dh]
        return self.out(out.transpose(-3, -2).reshape(*lead, t, d))


class SelfAttentionLayer(nn.Module):
    """A post-norm transformer layer along one axis of ``[batch, L, node, D]``.

    ``y = LN(x + drop(attn(x)))``, ``out = LN(y + drop(FFN(y)))`` with ``FFN = W₂ relu(W₁ ·)``.

    Args:
        dim: token size ``D``.
        ff_dim: hidden size of the feed-forward block.
        heads: attention heads.
        dropout: dropout after attention and feed-forward.
    """

    def __init__(self, dim: int, ff_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """``x: [batch, L, node, D]``; ``axis`` 1 attends along time, 2 along nodes."""
        x = x.transpose(axis, -2)  # the attended axis next to the features
        y = self.ln1(x + self.drop1(self.attn(x)))
        out = self.ln2(y + self.drop2(self.ff(y)))
        return out.transpose(axis, -2)


@TEACHERS.register("staeformer")
class STAEformer(Network):
    """STAEformer (see the module docstring).

    With the paper's sizes (24 + 24 + 24 + 80 = 152 wide tokens, 3 + 3 layers, feed-forward 256)
    a step on ~200 nodes is slow on a CPU; the defaults here are narrower (16 + 16 + 8 + 24 = 64
    wide, 2 + 2 layers, feed-forward 128), about 200k parameters for 200 nodes.

    Args:
        dims: data sizes.
        adjacency: ignored (the spatial attention and the adaptive embedding learn the graph).
        input_dim: size of the input embedding.
        tod_dim: size of the time-of-day embedding (0 disables it).
        dow_dim: size of the day-of-week embedding (0 disables it).
        adaptive_dim: size of the spatio-temporal adaptive embedding (0 disables it).
        ff_dim: hidden size of the feed-forward blocks.
        heads: attention heads (must divide the token size).
        temporal_layers: transformer layers along time.
        spatial_layers: transformer layers along nodes.
        dropout: dropout inside the layers.
        slots: time-of-day slots per day (288 = 5-minute steps).
        spread: also output a log-variance.
    """

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        input_dim: int = 16,
        tod_dim: int = 16,
        dow_dim: int = 8,
        adaptive_dim: int = 24,
        ff_dim: int = 128,
        heads: int = 4,
        temporal_layers: int = 2,
        spatial_layers: int = 2,
        dropout: float = 0.1,
        slots: int = DAY_SLOTS,
        spread: bool = False,
    ) -> None:
        super().__init__(dims, spread)
        del adjacency
        if min(input_dim, ff_dim, heads, slots) <= 0:
            raise ConfigError("input_dim, ff_dim, heads and slots must be positive", "staeformer")
        if min(tod_dim, dow_dim, adaptive_dim, temporal_layers, spatial_layers) < 0:
            raise ConfigError("embedding sizes and layer counts must be >= 0", "staeformer")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}", "staeformer")
        self.slots = slots
        self.model_dim = input_dim + tod_dim + dow_dim + adaptive_dim
        self.input_proj = nn.Linear(dims.in_channels, input_dim)
        self.tod = nn.Embedding(slots, tod_dim) if tod_dim else None
        self.dow = nn.Embedding(7, dow_dim) if dow_dim else None
        self.learns_weekdays = dow_dim > 0
        self.adaptive = (
            nn.Parameter(torch.empty(dims.input_steps, dims.nodes, adaptive_dim))
            if adaptive_dim
            else None
        )
        if self.adaptive is not None:
            nn.init.xavier_uniform_(self.adaptive)
        d = self.model_dim
        self.temporal = nn.ModuleList(
            SelfAttentionLayer(d, ff_dim, heads, dropout) for _ in range(temporal_layers)
        )
        self.spatial = nn.ModuleList(
            SelfAttentionLayer(d, ff_dim, heads, dropout) for _ in range(spatial_layers)
        )
        self.head = nn.Linear(dims.input_steps * d, self.head_size)

    def embed(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> torch.Tensor:
        """The input tokens ``[batch, L, node, D]``."""
        b, steps, n, _ = x.shape
        parts = [self.input_proj(clean_inputs(x))]  # [b, L, node, input_dim]
        if self.tod is not None:
            tod = self.tod(time_slot(time_of_day, self.slots))  # [b, L, tod_dim]
            parts.append(tod[:, :, None, :].expand(b, steps, n, -1))
        if self.dow is not None:
            dow = self.dow(day_of_week.long().clamp(0, 6))  # [b, L, dow_dim]
            parts.append(dow[:, :, None, :].expand(b, steps, n, -1))
        if self.adaptive is not None:
            parts.append(self.adaptive.unsqueeze(0).expand(b, -1, -1, -1))
        return torch.cat(parts, dim=-1)

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> NetOutput:
        check_inputs(x, time_of_day, day_of_week, self.dims)
        h = self.embed(x, time_of_day, day_of_week)  # [batch, L, node, D]
        for layer in self.temporal:
            h = layer(h, axis=1)
        for layer in self.spatial:
            h = layer(h, axis=2)
        b, steps, n, d = h.shape
        flat = h.permute(0, 2, 1, 3).reshape(b, n, steps * d)  # [batch, node, L*D]
        # the hidden state for hint distillation: each node's tokens averaged over the input
        # steps, [batch, node, D] (L times smaller than what the head reads, so it can be served)
        hidden = h.mean(dim=1)
        return self.split_head(self.head(flat), hidden)
