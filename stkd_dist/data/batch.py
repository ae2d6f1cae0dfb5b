"""The batch every loader yields and every model, loss and service consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class WindowBatch(NamedTuple):
    """A batch of windows.

    ``index``, ``x``, ``y`` and ``mask`` come first so the batch also unpacks as the
    ``(window_index, x, y, mask)`` tuple of the data-plane contract.

    Attributes:
        index: ``[batch]`` int64 window indices (start steps).
        x: ``[batch, L, node, channel_in]`` float32 inputs, normalised with the training split's
            statistics, 0 where not observed.
        y: ``[batch, H, node, channel_out]`` float32 targets in original units, 0 where not observed.
        mask: ``[batch, H, node, channel_out]`` bool, True where the target is observed. All False for
            padding samples, so masked losses and metrics ignore them.
        x_mask: ``[batch, L, node, channel_in]`` bool, True where the input is observed.
        time_of_day: ``[batch, L]`` float32 in ``[0, 1)``: fraction of the day of each input step.
        day_of_week: ``[batch, L]`` int64, 0 = Monday, of each input step.
        valid: ``[batch]`` bool, False for padding samples (see the shard plan).
    """

    # a field named like tuple.index on purpose (a NamedTuple: torch collates and pins it)
    index: torch.Tensor  # type: ignore[assignment]
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    x_mask: torch.Tensor
    time_of_day: torch.Tensor
    day_of_week: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device | str) -> WindowBatch:
        """Move every tensor to ``device``."""
        return WindowBatch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class DataDims:
    """The sizes a model is built for, derived from a dataset and a window spec."""

    nodes: int
    input_steps: int
    horizon: int
    in_channels: int
    out_channels: int

    def __post_init__(self) -> None:
        for name in ("nodes", "input_steps", "horizon", "in_channels", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DataDims.{name} must be a positive int, got {value!r}")
