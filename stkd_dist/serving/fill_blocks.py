"""The pieces of a label-cache fill both fill modes share: time blocks and the block runner.

:class:`BlockRunner` runs a teacher over the windows of consecutive cache chunks through the one
shared micro-batched forward pass (:mod:`~stkd_dist.serving.forward`), on the fill's device and
precision, in the teacher's micro-batches; the threads of :mod:`~stkd_dist.serving.precompute`
share one runner, each Ray task of :mod:`~stkd_dist.serving.precompute_ray` has its own.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stkd_dist.serving.forward import forward_micro_batches, prepare_inputs, resolve_compute
from stkd_dist.serving.label_arrays import NumpyLabels, concat_labels, take_rows
from stkd_dist.serving.teacher import Teacher


@dataclass(frozen=True)
class TeacherSource:
    """Where a worker loads the teacher from (the arguments of ``load_teacher``)."""

    checkpoint: str
    data: str
    storage: str | None = None


@dataclass(frozen=True)
class Block:
    """A time block: consecutive chunks of one split, and the windows of each."""

    split: str
    chunks: tuple[int, ...]
    windows: tuple[np.ndarray, ...]

    @property
    def n_windows(self) -> int:
        return int(sum(len(w) for w in self.windows))


class BlockRunner:
    """Runs a teacher on windows on one device, in the teacher's micro-batches and precision.

    Args:
        teacher: the teacher (its reader, micro-batch and, by default, precision).
        device: ``cpu`` or ``cuda`` (resolved).
        precision: the fill's precision (None: the teacher's).
        hidden: also compute the hidden states (a cache that stores them).
    """

    def __init__(
        self, teacher: Teacher, device: str, precision: str | None = None, hidden: bool = False
    ) -> None:
        self.teacher = teacher
        self.hidden = hidden
        own = teacher.compute
        # the teacher's device when it is of the asked type (its index included), else `device`
        where = own.device if torch.device(device).type == own.device_type else device
        self.compute = resolve_compute(where, precision or own.precision, own.micro_batch)
        self._lock = threading.Lock()
        # with the teacher's own settings a run is the teacher's own predict; another device or
        # precision runs a copy of the model (the caller's teacher stays where it is)
        self.model = (
            None
            if self.compute == own
            else copy.deepcopy(teacher.model).to(self.compute.torch_device)
        )

    def predict(self, idx: np.ndarray) -> NumpyLabels:
        """The labels of windows ``idx`` as :meth:`Teacher.predict` computes them."""
        if self.model is None:
            return self.teacher.predict(idx, hidden=self.hidden)
        # reading outside the lock: other fill threads read while this model computes
        batch = prepare_inputs(self.teacher.reader, idx, self.compute)
        with self._lock:
            return forward_micro_batches(self.model, batch, self.compute, hidden=self.hidden)

    def chunks(
        self,
        chunks: Sequence[int],
        windows: Sequence[np.ndarray],
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> Iterator[tuple[int, NumpyLabels]]:
        """``(chunk, labels)`` of consecutive chunks, computed ``batch_size`` at a time.

        Chunks may hold fewer windows than a micro-batch: consecutive chunks are computed
        together (at least ``batch_size`` windows per group, whole chunks) so that no call pads
        a few windows to a whole micro-batch, then split again for writing.
        """
        if len(chunks) != len(windows):
            raise ValueError("one window array per chunk")
        group: list[int] = []
        for i in range(len(chunks)):
            group.append(i)
            if sum(len(windows[j]) for j in group) < batch_size and i < len(chunks) - 1:
                continue
            index = np.concatenate([windows[j] for j in group])
            parts: list[NumpyLabels] = []
            for b in range(0, len(index), batch_size):
                labels = self.predict(index[b : b + batch_size])
                parts.append(labels)
                if progress is not None:
                    progress(len(labels.prediction))
            every = concat_labels(parts)
            lo = 0
            for j in group:
                hi = lo + len(windows[j])
                yield chunks[j], take_rows(every, slice(lo, hi))
                lo = hi
            group = []
