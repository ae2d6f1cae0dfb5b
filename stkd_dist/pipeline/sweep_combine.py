"""How a sweep's checkpoints are combined, in memory: weight averaging and forecast averaging.

:func:`greedy_soup` is the greedy recipe of Wortsman et al., 2022, "Model soups": candidates of
one architecture, best first, each kept only when the uniform average of the kept weights scores
better with it. :class:`MeanEnsemble` averages several models' forecasts instead, so its members
may differ in architecture. :mod:`.sweep_aggregate` applies both to a sweep and exports them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stkd_dist.distill.ensemble import teacher_weights
from stkd_dist.errors import InputError

if TYPE_CHECKING:
    from stkd_dist.models import Forecaster

StateDict = dict[str, torch.Tensor]


# -- weight averaging ------------------------------------------------------------------------


def architecture(model: Forecaster) -> tuple[Any, ...]:
    """What two models must share for their weights to be averaged: the key, kwargs and dims,
    and every state-dict entry's name, shape and dtype (the same key with other kwargs, e.g. a
    wider layer or per-node weights, is another architecture)."""
    spec = model.spec()
    entries = tuple((k, tuple(t.shape), str(t.dtype)) for k, t in model.state_dict().items())
    return spec["key"], json.dumps(spec["kwargs"], sort_keys=True), str(spec["dims"]), entries


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The uniform average of state dicts of one architecture (new tensors, on their device).

    Floating-point entries are averaged in float64 and cast back to their dtype. The others
    (integer counters such as BatchNorm's ``num_batches_tracked``, boolean masks) are taken from
    the first state: an average of counters means nothing and would not survive the cast back.
    Entries equal in every state (target statistics, a graph's adjacency) are copied from the
    first, so they stay bit-identical instead of picking up the average's rounding.
    """
    if not states:
        raise InputError("needs at least one state dict", where="soup")
    first = states[0]
    for other in states[1:]:
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in other.items()}
        if shapes != {k: (tuple(t.shape), t.dtype) for k, t in first.items()}:
            raise InputError("state dicts of different architectures", where="soup")
    out: StateDict = {}
    for name, tensor in first.items():
        values = [tensor.detach(), *(s[name].detach() for s in states[1:])]
        if not tensor.is_floating_point() or all(torch.equal(values[0], v) for v in values[1:]):
            out[name] = values[0].clone()
        else:
            out[name] = torch.stack(values).to(torch.float64).mean(0).to(tensor.dtype)
    return out


@dataclass(frozen=True, eq=False)
class Soup:
    """A greedy soup.

    Attributes:
        members: the trials in the soup, in the order they joined (the first is the start).
        state: the averaged state dict of the members.
        val_mae: the soup's validation MAE (what decided every addition).
        tried: ``(trial, validation MAE of the soup with it, accepted)`` for every candidate.
    """

    members: tuple[str, ...]
    state: StateDict
    val_mae: float
    tried: tuple[tuple[str, float, bool], ...]


def greedy_soup(
    template: nn.Module,
    candidates: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
    score: Callable[[nn.Module], float],
) -> Soup:
    """Greedy soup of ``candidates`` (``(trial, state dict)``, best first): see the module doc.

    ``template`` (a module of the candidates' architecture) is loaded with every soup tried and
    ``score``-d (lower is better); it holds the final soup on return. A candidate joins only when
    it strictly lowers the score (a tie adds nothing the validation split can see) and a
    non-finite score never wins. ``candidates`` may be a generator: only the members' states are
    kept, each rejected one is dropped as soon as it has been tried.
    """
    it: Iterator[tuple[str, Mapping[str, torch.Tensor]]] = iter(candidates)
    start = next(it, None)
    if start is None:
        raise InputError("needs at least one candidate", where="soup")
    members, states = [start[0]], [start[1]]
    soup = average_states(states)  # a copy: loading the template must not alter a member
    template.load_state_dict(soup)
    best = float(score(template))
    tried = [(start[0], best, True)]
    for trial, state in it:
        trial_soup = average_states([*states, state])
        template.load_state_dict(trial_soup)
        mae = float(score(template))
        accepted = mae < best  # False for NaN, and for NaN as ``best``
        tried.append((trial, mae, accepted))
        if accepted:
            members.append(trial)
            states.append(state)
            soup, best = trial_soup, mae
    template.load_state_dict(soup)
    return Soup(tuple(members), soup, best, tuple(tried))


# -- forecast averaging ----------------------------------------------------------------------


class MeanEnsemble(nn.Module):
    """The weighted mean forecast (original units) of several forecasters, called like one.

    Args:
        members: models mapping ``(x, time_of_day, day_of_week)`` to ``[batch, H, node, C_out]``.
        weights: one per member, non-negative, summing to 1 (default: equal).
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise InputError("needs at least one member", where="ensemble")
        w = teacher_weights(len(members)) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or not all(math.isfinite(v) and v >= 0 for v in w):
            raise InputError(f"needs one weight >= 0 per member, got {w}", where="ensemble")
        if not math.isclose(sum(w), 1.0, rel_tol=1e-6):
            raise InputError(f"weights must sum to 1, got {sum(w)}", where="ensemble")
        self.members = nn.ModuleList(members)
        self.weights = tuple(w)

    def forward(
        self, x: torch.Tensor, time_of_day: torch.Tensor, day_of_week: torch.Tensor
    ) -> torch.Tensor:
        """``Σ wᵢ · memberᵢ(x, ...)``: ``[batch, H, node, C_out]``."""
        preds = torch.stack([m(x, time_of_day, day_of_week) for m in self.members])
        w = torch.tensor(self.weights, dtype=preds.dtype, device=preds.device)
        return (w.reshape(-1, *([1] * (preds.dim() - 1))) * preds).sum(0)

    def num_params(self) -> int:
        """Trainable parameters of all members (what serving the ensemble holds)."""
        return sum(sum(p.numel() for p in m.parameters() if p.requires_grad) for m in self.members)


__all__ = ["MeanEnsemble", "Soup", "StateDict", "architecture", "average_states", "greedy_soup"]
