"""``stgnn`` teacher: Graph WaveNet.

Wu, Pan, Long, Jiang, Zhang, "Graph WaveNet for Deep Spatial-Temporal Graph Modeling", IJCAI 2019.

Stacked layers of a gated dilated temporal convolution (``tanh(W_f * x) ⊙ sigmoid(W_g * x)``)
followed by a diffusion graph convolution over

* the forward and backward transition matrices of the dataset graph (row-normalised ``A`` and
  ``Aᵀ``), each applied for ``K`` diffusion steps, and
* a learned adaptive adjacency ``softmax(relu(E1 E2ᵀ))``,

with residual connections around each layer and skip connections from every layer summed into two
1×1 "end" convolutions that emit all ``H × C_out`` outputs at once. The dataset adjacency is a
registered buffer, so a checkpoint carries the graph it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.models.base import NetOutput, Network
from stkd_dist.models.features import TIME_CHANNELS, check_inputs, clean_inputs, with_time_channels
from stkd_dist.models.registry import TEACHERS


def transition(adj: torch.Tensor) -> torch.Tensor:
    """Row-normalised transition matrix ``D⁻¹ A`` (rows without edges stay zero)."""
    deg = adj.sum(dim=1, keepdim=True)
    return torch.where(deg > 0, adj / deg.clamp_min(1e-12), torch.zeros_like(adj))


class DiffusionConv(nn.Module):
    """Diffusion graph convolution: ``W [x, P₁x, P₁²x, …, P_S^K x]`` (1×1 conv over the stack).

    Args:
        channels_in, channels_out: feature channels.
        supports: number of transition matrices it is called with.
        steps: diffusion steps ``K`` per matrix.
        dropout: dropout on the output.
    """

    def __init__(
        self, channels_in: int, channels_out: int, supports: int, steps: int, dropout: float
    ) -> None:
        super().__init__()
        self.steps = steps
        self.mlp = nn.Conv2d((supports * steps + 1) * channels_in, channels_out, kernel_size=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, supports: list[torch.Tensor]) -> torch.Tensor:
        # x: [batch, channel, node, time]; each support: [node, node]
        out = [x]
        for p in supports:
            h = x
            for _ in range(self.steps):
                h = torch.einsum("wv,bcvt->bcwt", p, h)  # node w gathers from its neighbours v
                out.append(h)
        return self.drop(self.mlp(torch.cat(out, dim=1)))


@TEACHERS.register("stgnn")
class GraphWaveNet(Network):
    """Graph WaveNet (see the module docstring).

    With the defaults (4 blocks × 2 layers, dilations 1, 2, kernel 2) the receptive field is 13
    steps; shorter inputs are left-padded with zeros, and of longer ones the last 13 steps reach the
    output. Without a dataset adjacency the fixed supports are the identity and the adaptive
    adjacency carries the graph.

    Args:
        dims: data sizes.
        adjacency: ``[node, node]`` dense weighted adjacency (row = from), or None.
        residual_channels, dilation_channels, skip_channels, end_channels: layer widths.
        blocks: repeated blocks of ``layers_per_block`` layers with dilations 1, 2, 4, ...
        layers_per_block: layers per block.
        kernel_size: temporal kernel size.
        diffusion_steps: ``K``.
        adaptive: learn the adaptive adjacency.
        node_emb_dim: size of the node embeddings ``E1``, ``E2``.
        dropout: dropout after each graph convolution.
        spread: also output a log-variance.
    """

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        residual_channels: int = 32,
        dilation_channels: int = 32,
        skip_channels: int = 256,
        end_channels: int = 512,
        blocks: int = 4,
        layers_per_block: int = 2,
        kernel_size: int = 2,
        diffusion_steps: int = 2,
        adaptive: bool = True,
        node_emb_dim: int = 10,
        dropout: float = 0.3,
        spread: bool = False,
    ) -> None:
        super().__init__(dims, spread)
        sizes = (residual_channels, dilation_channels, skip_channels, end_channels, blocks)
        if min(*sizes, layers_per_block, kernel_size, diffusion_steps, node_emb_dim) <= 0:
            raise ConfigError("channel sizes, layer counts and steps must be positive", "stgnn")
        n = dims.nodes
        if adjacency is None:
            adj = np.eye(n, dtype=np.float32)
        else:
            adj = np.asarray(adjacency, dtype=np.float32)
            if adj.shape != (n, n):
                raise ConfigError(f"shape {adj.shape} is not [{n}, {n}] (node, node)", "adjacency")
            if not np.isfinite(adj).all() or (adj < 0).any():
                raise ConfigError("weights must be finite and non-negative", "adjacency")
        self.adjacency: torch.Tensor
        self.register_buffer("adjacency", torch.from_numpy(adj.copy()))  # [node, node]
        self.adaptive = bool(adaptive)
        if self.adaptive:
            self.node_vec1 = nn.Parameter(torch.randn(n, node_emb_dim))
            self.node_vec2 = nn.Parameter(torch.randn(n, node_emb_dim))
        n_supports = 2 + int(self.adaptive)

        self.start = nn.Conv2d(dims.in_channels + TIME_CHANNELS, residual_channels, kernel_size=1)
        self.filters = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.gconvs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.receptive_field = 1
        for _ in range(blocks):
            dilation = 1
            for _ in range(layers_per_block):
                for convs in (self.filters, self.gates):
                    convs.append(
                        nn.Conv2d(
                            residual_channels,
                            dilation_channels,
                            kernel_size=(1, kernel_size),
                            dilation=(1, dilation),
                        )
                    )
                self.skips.append(nn.Conv2d(dilation_channels, skip_channels, kernel_size=1))
                # Only the skip path of the last layer reaches the output: a graph convolution
                # there would hold parameters without gradients, which DDP rejects.
                if len(self.filters) < blocks * layers_per_block:
                    self.gconvs.append(
                        DiffusionConv(
                            dilation_channels,
                            residual_channels,
                            n_supports,
                            diffusion_steps,
                            dropout,
                        )
                    )
                    self.norms.append(nn.BatchNorm2d(residual_channels))
                self.receptive_field += (kernel_size - 1) * dilation
                dilation *= 2
        self.end1 = nn.Conv2d(skip_channels, end_channels, kernel_size=1)
        self.end2 = nn.Conv2d(end_channels, self.head_size, kernel_size=1)

    def supports(self) -> list[torch.Tensor]:
        """Forward and backward transition matrices, then the adaptive adjacency if enabled."""
        out = [transition(self.adjacency), transition(self.adjacency.T)]
        if self.adaptive:
            out.append(F.softmax(F.relu(self.node_vec1 @ self.node_vec2.T), dim=1))
        return out

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> NetOutput:
        check_inputs(x, time_of_day, day_of_week, self.dims)
        h = with_time_channels(clean_inputs(x), time_of_day, day_of_week)  # [b, L, node, C+2]
        h = h.permute(0, 3, 2, 1)  # [batch, channel, node, time]: conv layout
        if h.shape[-1] < self.receptive_field:
            h = F.pad(h, (self.receptive_field - h.shape[-1], 0))
        h = self.start(h)  # [batch, residual, node, time]
        supports = self.supports()
        skip: torch.Tensor | None = None
        last = len(self.filters) - 1
        for i, (filt, gate, skip_conv) in enumerate(
            zip(self.filters, self.gates, self.skips, strict=True)
        ):
            residual = h
            h = torch.tanh(filt(h)) * torch.sigmoid(gate(h))  # [batch, dilation, node, time']
            s = skip_conv(h)  # [batch, skip, node, time']
            skip = s if skip is None else s + skip[..., -s.shape[-1] :]
            if i < last:
                h = self.gconvs[i](h, supports) + residual[..., -h.shape[-1] :]
                h = self.norms[i](h)  # [batch, residual, node, time']
        assert skip is not None
        feat = F.relu(skip[..., -1:])  # [batch, skip, node, 1]: the last position
        out = self.end2(F.relu(self.end1(feat)))  # [batch, head_size, node, 1]
        flat = out.squeeze(-1).transpose(1, 2)  # [batch, node, head_size]
        hidden = feat.squeeze(-1).transpose(1, 2)  # [batch, node, skip]
        return self.split_head(flat, hidden)


@TEACHERS.register("stgnn_inductive")
class InductiveGraphWaveNet(GraphWaveNet):
    """Graph WaveNet without the adaptive adjacency: every parameter is shaped by the channels,
    none by the nodes, so a teacher trained on one graph forecasts another (transfer).

    The graph enters only through the diffusion over the given adjacency (the forward and
    backward transition matrices), so the network is equivariant to renumbering the nodes:
    permuting the nodes of the input and the adjacency permutes the forecast the same way.

    Args: those of :class:`GraphWaveNet` without ``adaptive`` and ``node_emb_dim``.
    """

    transferable = True

    def __init__(
        self,
        dims: DataDims,
        adjacency: np.ndarray | None = None,
        residual_channels: int = 32,
        dilation_channels: int = 32,
        skip_channels: int = 256,
        end_channels: int = 512,
        blocks: int = 4,
        layers_per_block: int = 2,
        kernel_size: int = 2,
        diffusion_steps: int = 2,
        dropout: float = 0.3,
        spread: bool = False,
    ) -> None:
        super().__init__(
            dims,
            adjacency,
            residual_channels=residual_channels,
            dilation_channels=dilation_channels,
            skip_channels=skip_channels,
            end_channels=end_channels,
            blocks=blocks,
            layers_per_block=layers_per_block,
            kernel_size=kernel_size,
            diffusion_steps=diffusion_steps,
            adaptive=False,
            dropout=dropout,
            spread=spread,
        )
