"""The teacher's outputs on some windows as one typed record: :class:`LabelArrays`.

Everything that computes, batches, caches, streams or reads soft labels passes them as a
``LabelArrays``: the forecast ``prediction`` and, when the teacher has them and they were asked
for, its ``spread`` (log-variance) and its ``hidden`` representation (what its output head reads,
for hint distillation). A new output is one more field here, not one more tuple element in every
module.

Shapes (``n`` windows, teacher with ``H`` steps, ``N`` nodes, ``C`` output channels, hidden width
``F``)::

    prediction  [n, H, N, C]   float32 (numpy on the serving side, torch on a student worker)
    spread      [n, H, N, C]   or None
    hidden      [n, N, F]      or None

The node axis is 2 for prediction and spread and 1 for hidden (:data:`NODE_AXIS`): node slices
(:mod:`~stkd_dist.serving.codec_slices`) cut every array along its own node axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

A = TypeVar("A")
B = TypeVar("B")

#: the outputs in their fixed order (checksums, wire fields and caches follow it)
OUTPUT_NAMES = ("prediction", "spread", "hidden")
#: the node axis of each output
NODE_AXIS = {"prediction": 2, "spread": 2, "hidden": 1}


@dataclass(frozen=True)
class LabelArrays(Generic[A]):
    """The labels of ``n`` windows, in the windows' order (see the module docstring).

    Attributes:
        prediction: ``[n, H, N, C]`` the teacher's forecast in original units.
        spread: ``[n, H, N, C]`` its log-variance (units²), or None.
        hidden: ``[n, N, F]`` its hidden representation, or None.
    """

    prediction: A
    spread: A | None = None
    hidden: A | None = None

    def named(self) -> dict[str, A]:
        """The arrays present, by output name, in :data:`OUTPUT_NAMES` order."""
        out = {"prediction": self.prediction}
        if self.spread is not None:
            out["spread"] = self.spread
        if self.hidden is not None:
            out["hidden"] = self.hidden
        return out

    @classmethod
    def from_named(cls, arrays: Mapping[str, A]) -> LabelArrays[A]:
        """The record of ``arrays`` by output name (``prediction`` required)."""
        return cls(arrays["prediction"], arrays.get("spread"), arrays.get("hidden"))

    def map(self, fn: Callable[[A], B]) -> LabelArrays[B]:
        """``fn`` applied to every array present (e.g. ``torch.from_numpy``, a row selection)."""
        return LabelArrays(
            fn(self.prediction),
            None if self.spread is None else fn(self.spread),
            None if self.hidden is None else fn(self.hidden),
        )

    def keep(self, spread: bool, hidden: bool) -> LabelArrays[A]:
        """These labels without the outputs not wanted (``spread`` / ``hidden`` False)."""
        return LabelArrays(
            self.prediction,
            self.spread if spread else None,
            self.hidden if hidden else None,
        )


NumpyLabels = LabelArrays[np.ndarray]


def empty_labels(
    window_shape: tuple[int, ...], has_spread: bool, hidden_dim: int = 0
) -> NumpyLabels:
    """Labels of no windows: ``[0, H, N, C]`` float32 (hidden ``[0, N, F]`` with ``hidden_dim``)."""
    empty = np.zeros((0, *window_shape), dtype=np.float32)
    hidden = np.zeros((0, window_shape[1], hidden_dim), dtype=np.float32) if hidden_dim else None
    return LabelArrays(empty, empty.copy() if has_spread else None, hidden)


def take_rows(labels: NumpyLabels, rows: np.ndarray | slice | list[int] | int) -> NumpyLabels:
    """The labels of windows ``rows`` (numpy indexing: a copy, or a view for a slice or an int,
    which also drops the window axis)."""
    return labels.map(lambda a: a[rows])


def node_slice(labels: NumpyLabels, start: int, stop: int) -> NumpyLabels:
    """Nodes ``[start, stop)`` of every array, along each one's node axis (strided views)."""
    return LabelArrays.from_named(
        {
            # basic slicing: views, gathered by the one copy tensor_bytes makes anyway
            name: a[(slice(None),) * NODE_AXIS[name] + (slice(start, stop),)]
            for name, a in labels.named().items()
        }
    )


def label_bytes(labels: NumpyLabels) -> int:
    """Bytes of every array present."""
    return int(sum(a.nbytes for a in labels.named().values()))


def allocate_like(n: int, like: NumpyLabels) -> NumpyLabels:
    """Uninitialised float32 labels of ``n`` windows with the outputs and shapes of ``like``."""
    return like.map(lambda a: np.empty((n, *a.shape[1:]), dtype=np.float32))


def put_rows(out: NumpyLabels, rows: np.ndarray | slice, labels: NumpyLabels) -> None:
    """Copy ``labels`` into rows ``rows`` of ``out``, output by output (those ``out`` holds)."""
    src = labels.named()
    for name, a in out.named().items():
        a[rows] = src[name]


def merge_rows(hit: np.ndarray, cached: NumpyLabels, computed: NumpyLabels) -> NumpyLabels:
    """One window sequence from two sources: ``cached`` rows where ``hit`` ``[n]``, ``computed``
    rows elsewhere, in order; only the outputs both hold."""
    both = {k: v for k, v in computed.named().items() if k in cached.named()}
    out = allocate_like(len(hit), LabelArrays.from_named(both))
    put_rows(out, hit, cached)
    put_rows(out, ~hit, computed)
    return out


def concat_labels(parts: list[NumpyLabels]) -> NumpyLabels:
    """The labels of consecutive parts as one (the parts hold the same outputs)."""
    names = parts[0].named()
    return LabelArrays.from_named(
        {name: np.concatenate([p.named()[name] for p in parts]) for name in names}
    )
