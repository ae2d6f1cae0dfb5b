"""The network contract and :class:`Forecaster`, the de-normalising wrapper checkpoints hold.

Every network maps normalised inputs ``x: [batch, L, node, C_in]`` plus the time features of the
input steps to a :class:`NetOutput` in normalised units. :class:`Forecaster` wraps a network with the
target statistics as buffers, so a checkpoint alone predicts in original units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch
from torch import nn

from stkd_dist.data.batch import DataDims, WindowBatch
from stkd_dist.errors import ConfigError
from stkd_dist.models.registry import MODELS, build_network

#: what :meth:`Forecaster.forward` returns, chosen by its ``output`` argument
Output = Literal["mean", "spread", "features", "all"]
OUTPUTS: tuple[Output, ...] = ("mean", "spread", "features", "all")


class NetOutput(NamedTuple):
    """What a network returns (normalised units).

    Attributes:
        mean: ``[batch, H, node, C_out]`` point forecast.
        log_var: ``[batch, H, node, C_out]`` log-variance, or None when built without ``spread``.
        hidden: ``[batch, node, F]`` the representation the output head reads (for feature
            matching in distillation).
    """

    mean: torch.Tensor
    log_var: torch.Tensor | None
    hidden: torch.Tensor


class Forecast(NamedTuple):
    """A forecast in original units: mean, log-variance (units², or None) and hidden features."""

    mean: torch.Tensor
    log_var: torch.Tensor | None
    hidden: torch.Tensor


class Network(nn.Module):
    """Base class of the networks: holds ``dims`` and ``spread`` and splits the output head.

    Subclasses implement ``forward(x, time_of_day, day_of_week) -> NetOutput``.

    Args:
        dims: the sizes the network is built for.
        spread: also output a log-variance (the head is twice as wide).
    """

    #: whether no parameter depends on the node count, so the trained weights forecast
    #: another graph's nodes (given its adjacency and statistics): see :meth:`Forecaster.rebound`
    transferable: bool = False
    #: whether it learns a vector per day of the week: those of weekdays the training split does
    #: not hold stay untrained (see :mod:`stkd_dist.data.calendar`)
    learns_weekdays: bool = False

    def __init__(self, dims: DataDims, spread: bool = False) -> None:
        super().__init__()
        if not isinstance(dims, DataDims):
            raise ConfigError(f"dims must be a DataDims, got {type(dims).__name__}", where="dims")
        self.dims = dims
        self.spread = bool(spread)

    @property
    def head_size(self) -> int:
        """Width of the flat output head: ``H * C_out`` (twice that with ``spread``)."""
        return self.dims.horizon * self.dims.out_channels * (2 if self.spread else 1)

    def split_head(self, flat: torch.Tensor, hidden: torch.Tensor) -> NetOutput:
        """``flat: [batch, node, head_size]`` → :class:`NetOutput` with ``[batch, H, node, C_out]``."""
        b, n, _ = flat.shape
        h, c = self.dims.horizon, self.dims.out_channels
        # head layout per node: (2 if spread else 1) blocks of [H, C_out]
        out = flat.reshape(b, n, -1, h, c).permute(2, 0, 3, 1, 4)  # [k, batch, H, node, C_out]
        return NetOutput(out[0], out[1] if self.spread else None, hidden)


def _as_scale(value: Any, nodes: int, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value, dtype=np.float32))
    try:
        t = torch.broadcast_to(t, (nodes, channels)).clone()
    except RuntimeError as e:
        raise ConfigError(
            f"shape {list(t.shape)} does not broadcast to [node, C_out] = [{nodes}, {channels}]",
            where=name,
        ) from e
    if not torch.isfinite(t).all():
        raise ConfigError("must be finite", where=name)
    return t


class Forecaster(nn.Module):
    """A network plus target de-normalisation: predicts in original units.

    Args:
        network: the wrapped network (from :func:`build_network`).
        key: its registry key.
        kwargs: the hyper-parameters it was built with (JSON-serialisable).
        dims: the sizes it was built for.
        target_mean, target_std: broadcastable to ``[node, C_out]``, the statistics the targets were
            normalised with; predictions are ``net_out * std + mean``.
    """

    def __init__(
        self,
        network: nn.Module,
        key: str,
        kwargs: dict[str, Any],
        dims: DataDims,
        target_mean: Any,
        target_std: Any,
    ) -> None:
        super().__init__()
        self.network = network
        self.key = key
        self.kwargs = dict(kwargs)
        self.dims = dims
        mean = _as_scale(target_mean, dims.nodes, dims.out_channels, "target_mean")
        std = _as_scale(target_std, dims.nodes, dims.out_channels, "target_std")
        if (std <= 0).any():
            raise ConfigError("must be positive", where="target_std")
        self.target_mean: torch.Tensor
        self.target_std: torch.Tensor
        self.register_buffer("target_mean", mean)  # [node, C_out]
        self.register_buffer("target_std", std)  # [node, C_out]
        self._hidden_dim: int | None = None  # found by hidden_dim() on first use

    @property
    def has_spread(self) -> bool:
        return bool(getattr(self.network, "spread", False))

    @overload
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["mean"] = "mean",
    ) -> torch.Tensor: ...
    @overload
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["spread", "features"],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["all"],
    ) -> Forecast: ...
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Output = "mean",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Forecast:
        """Forecast in original units.

        Args:
            x: ``[batch, L, node, C_in]`` normalised inputs.
            time_of_day: ``[batch, L]`` in ``[0, 1)``; day_of_week: ``[batch, L]`` int.
            output: ``"mean"`` → ``[batch, H, node, C_out]``; ``"spread"`` → ``(mean, log_var)``;
                ``"features"`` → ``(mean, hidden [batch, node, F])``; ``"all"`` → :class:`Forecast`.
                Going through ``forward`` (not a side method) keeps DDP's hooks in the call.
        """
        out: NetOutput = self.network(x, time_of_day, day_of_week)
        mean = out.mean * self.target_std + self.target_mean  # [batch, H, node, C_out]
        log_var = None
        if out.log_var is not None:
            # Var[std * z + mean] = std² Var[z]
            log_var = out.log_var + 2.0 * torch.log(self.target_std)
        if output == "mean":
            return mean
        if output == "spread":
            if log_var is None:
                raise ConfigError(
                    f"model {self.key!r} was built without spread=True", where="output"
                )
            return mean, log_var
        if output == "features":
            return mean, out.hidden
        if output == "all":
            return Forecast(mean, log_var, out.hidden)
        raise ConfigError(f"must be one of {', '.join(OUTPUTS)}, got {output!r}", where="output")

    def forward_with_spread(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_var)`` in original units (log-variance in units²)."""
        out: tuple[torch.Tensor, torch.Tensor] = self(x, time_of_day, day_of_week, output="spread")
        return out

    def hidden_dim(self) -> int:
        """F, the width of the hidden representation ``[batch, node, F]`` of ``output="features"``.

        Networks do not declare it, so it is measured once: one all-zero window through the
        model in eval mode (dropout off, so no random numbers are drawn and the training's random
        state is untouched), on the model's device; the training mode is restored after.
        """
        if self._hidden_dim is None:
            d, device = self.dims, self.target_mean.device
            x = torch.zeros(1, d.input_steps, d.nodes, d.in_channels, device=device)
            tod = torch.zeros(1, d.input_steps, device=device)
            dow = torch.zeros(1, d.input_steps, dtype=torch.long, device=device)
            training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    _, hidden = self(x, tod, dow, output="features")  # [1, node, F]
            finally:
                self.train(training)
            self._hidden_dim = int(hidden.shape[-1])
        return self._hidden_dim

    def forward_batch(self, batch: WindowBatch) -> torch.Tensor:
        """The mean forecast ``[batch, H, node, C_out]`` of a :class:`WindowBatch`."""
        mean: torch.Tensor = self(batch.x, batch.time_of_day, batch.day_of_week)
        return mean

    def num_params(self) -> int:
        """Number of trainable parameters of the network."""
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad)

    @property
    def transferable(self) -> bool:
        """Whether the network's weights can forecast another graph (:meth:`rebound`)."""
        return bool(getattr(self.network, "transferable", False))

    @property
    def learns_weekdays(self) -> bool:
        """Whether the network learns an embedding per day of the week (its ``dow_dim`` > 0)."""
        return bool(getattr(self.network, "learns_weekdays", False))

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable ``{key, kwargs, dims, transferable}`` that :meth:`from_spec`
        rebuilds from (``transferable`` is recorded in every checkpoint's ``meta.json``)."""
        return {
            "key": self.key,
            "kwargs": dict(self.kwargs),
            "dims": dataclasses.asdict(self.dims),
            "transferable": self.transferable,
        }

    def rebound(
        self, nodes: int, adjacency: np.ndarray | None, target_scale: tuple[Any, Any]
    ) -> Forecaster:
        """This model's trained weights on another graph of ``nodes`` nodes (transfer).

        Args:
            nodes: the other graph's node count.
            adjacency: its ``[node, node]`` adjacency (None: no graph).
            target_scale: ``(mean, std)`` broadcastable to ``[node, C_out]``: the statistics
                the other graph's targets are normalised with.

        Raises:
            ConfigError: the network learns per-node parameters (not ``transferable``).
        """
        if not self.transferable:
            raise ConfigError(
                f"model {self.key!r} learns per-node parameters, so its weights do not apply to "
                "another graph: train a transferable teacher (e.g. teacher.model: stgnn_inductive)",
                where="teacher.model",
            )
        dims = dataclasses.replace(self.dims, nodes=int(nodes))
        other = build_forecaster(
            self.key, dims, adjacency=adjacency, target_scale=target_scale, **self.kwargs
        )
        # every parameter (and the normalisation layers' running statistics) is shaped by the
        # channels, never by the nodes; the graph and the target statistics stay the other's
        own = {k: v for k, v in self.network.state_dict().items() if k != "adjacency"}
        missing, unexpected = other.network.load_state_dict(own, strict=False)
        if unexpected or set(missing) - {"adjacency"}:
            raise ConfigError(
                f"weights of {self.key!r} do not fit {nodes} nodes (missing {missing}, "
                f"unexpected {unexpected})",
                where="teacher.model",
            )
        return other.to(self.target_mean.device).train(self.training)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], adjacency: np.ndarray | None = None) -> Forecaster:
        """Rebuild the architecture of :meth:`spec`; ``load_state_dict`` then fills every buffer
        (target statistics, and the adjacency of graph models) from a checkpoint."""
        try:
            key, kwargs, dims = spec["key"], spec.get("kwargs", {}), DataDims(**spec["dims"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a model spec ({e})", where="spec") from e
        return build_forecaster(key, dims, adjacency=adjacency, **kwargs)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, params={self.num_params()}"


def build_forecaster(
    key: str,
    dims: DataDims,
    /,
    *,
    adjacency: np.ndarray | None = None,
    target_scale: tuple[Any, Any] | None = None,
    **kwargs: Any,
) -> Forecaster:
    """Build the network ``key`` and wrap it in a :class:`Forecaster`.

    Args:
        key: teacher or student key.
        dims: data sizes.
        adjacency: ``[node, node]`` graph for graph models (ignored by the others).
        target_scale: ``(mean, std)`` broadcastable to ``[node, C_out]``; None = identity (0, 1).
        **kwargs: the network's hyper-parameters.
    """
    network = build_network(key, dims, adjacency, **kwargs)
    mean, std = target_scale if target_scale is not None else (0.0, 1.0)
    return Forecaster(network, key, _jsonable(kwargs), dims, mean, std)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists so a spec survives a JSON round trip unchanged."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError("must be finite", where=k)
        out[k] = v
    return out


__all__ = [
    "MODELS",
    "Forecast",
    "Forecaster",
    "NetOutput",
    "Network",
    "build_forecaster",
    "build_network",
]
