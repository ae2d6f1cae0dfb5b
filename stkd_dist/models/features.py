"""Input preparation shared by the networks: cleaning, time channels and time embeddings."""

from __future__ import annotations

import torch
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import InputError

#: number of continuous time channels :func:`with_time_channels` appends (time of day, day of week)
TIME_CHANNELS = 2
#: default number of time-of-day slots (5-minute steps)
DAY_SLOTS = 288


def check_inputs(
    x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor, dims: DataDims
) -> None:
    """Raise :class:`InputError` when the inputs do not match the sizes the network was built for."""
    expected = (dims.input_steps, dims.nodes, dims.in_channels)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise InputError(
            f"expected [batch, {', '.join(map(str, expected))}] (batch, L, node, channel), "
            f"got {list(x.shape)}",
            where="x",
        )
    for name, t in (("time_of_day", time_of_day), ("day_of_week", day_of_week)):
        if tuple(t.shape) != (x.shape[0], dims.input_steps):
            raise InputError(
                f"expected [{x.shape[0]}, {dims.input_steps}] (batch, L), got {list(t.shape)}",
                where=name,
            )


def clean_inputs(x: torch.Tensor) -> torch.Tensor:
    """Replace non-finite inputs by 0 (the normalised mean).

    The batch contract already zero-fills unobserved inputs; this also makes a NaN-marked input
    (e.g. straight from the store) behave exactly like a zero-filled one.
    """
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def with_time_channels(
    x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
) -> torch.Tensor:
    """Append time of day (in ``[0, 1)``) and day of week / 7 as channels.

    ``x: [batch, L, node, C]`` → ``[batch, L, node, C + 2]``.
    """
    b, steps, nodes, _ = x.shape
    tod = time_of_day.to(x.dtype)[:, :, None, None].expand(b, steps, nodes, 1)
    dow = (day_of_week.to(x.dtype) / 7.0)[:, :, None, None].expand(b, steps, nodes, 1)
    return torch.cat([x, tod, dow], dim=-1)


def time_slot(time_of_day: torch.Tensor, slots: int) -> torch.Tensor:
    """Slot index in ``[0, slots)`` of a time-of-day fraction (any shape, int64)."""
    return (time_of_day * slots).floor().long().clamp(0, slots - 1)


class TimeEmbedding(nn.Module):
    """Learned embeddings of the time-of-day slot and the day of week.

    Args:
        tod_dim: size of the time-of-day embedding (0 disables it).
        dow_dim: size of the day-of-week embedding (0 disables it).
        slots: time-of-day slots per day (288 = 5-minute steps).
    """

    def __init__(self, tod_dim: int, dow_dim: int, slots: int = DAY_SLOTS) -> None:
        super().__init__()
        if slots <= 0 or tod_dim < 0 or dow_dim < 0:
            raise ValueError("slots must be positive and embedding sizes non-negative")
        self.slots = slots
        self.dim = tod_dim + dow_dim
        self.tod = nn.Embedding(slots, tod_dim) if tod_dim else None
        self.dow = nn.Embedding(7, dow_dim) if dow_dim else None
        for emb in (self.tod, self.dow):
            if emb is not None:
                nn.init.xavier_uniform_(emb.weight)

    def forward(self, time_of_day: torch.Tensor, day_of_week: torch.Tensor) -> torch.Tensor:
        """``time_of_day: [batch]`` float, ``day_of_week: [batch]`` int → ``[batch, dim]``."""
        parts = []
        if self.tod is not None:
            parts.append(self.tod(time_slot(time_of_day, self.slots)))
        if self.dow is not None:
            parts.append(self.dow(day_of_week.long().clamp(0, 6)))
        if not parts:
            return time_of_day.new_zeros(time_of_day.shape[0], 0)
        return torch.cat(parts, dim=-1)
