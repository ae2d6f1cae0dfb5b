"""Soft labels on a student worker: where each rank gets its teachers' outputs, epoch by epoch.

A student rank reads its shard in the order of the epoch's shard plan. When the epoch starts it
asks every teacher for the labels of exactly those windows, in exactly that order
(:meth:`LabelSource.begin_epoch`), so they stream in while the rank reads its first block; each
batch then takes its labels by its window indices (:meth:`LabelSource.labels_for`). Which labels a
batch gets depends only on the plan, never on when or from which replica they arrived, so a run is
reproducible whatever failures the teachers have.

Teachers (:class:`TeacherSpec`):

* ``stream``: a teacher service (``stkd serve``; one or more replicas of the same teacher) read
  through :class:`~stkd_dist.serving.client.SoftLabelClient`, which resumes a broken stream at its
  cursor on another replica (every window exactly once);
* ``cache``: a label cache written by ``stkd precompute-labels``, read on demand (or loaded whole
  into memory, for benchmarks);
* ``replicas``: ``--teacher ray:N``: the driver starts N replicas as Ray actors and turns the spec
  into a ``stream`` teacher (``ray:<prefix>`` endpoints) before the workers start.

Labels travel as a :class:`~stkd_dist.serving.label_arrays.LabelArrays` of torch tensors: the
prediction ``[batch, H, N, C]``, the spread when ``LabelSpec.spread`` and the teacher's hidden
states ``[batch, N, F_t]`` when ``LabelSpec.hidden`` (``distill.loss: hint``; one teacher only).

Several teachers form an ensemble; their labels are combined per batch with
:func:`~stkd_dist.distill.ensemble.combine_teachers` (``mean`` or ``inverse_error`` by each
teacher's validation MAE, as ``Describe`` or the cache reports it).

The driver checks every teacher once before training (:func:`resolve_teachers`): the dataset
fingerprint, the label shape and the training windows must be the student's, and each teacher's
version is pinned so that every worker and every failover uses the very teacher that was checked.
The teacher specifications, their parsing and checks live in :mod:`stkd_dist.labels.teachers`
and are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from stkd_dist.distill.ensemble import combine_teachers
from stkd_dist.errors import ConfigError, InputError, StoreError
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, hint_cache_message, label_client
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientStats, PlanRequest
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels, take_rows

# the labels of a batch, as the loss takes them
Labels = LabelArrays[torch.Tensor]


class LabelSource(Protocol):
    """Soft labels of one rank, one epoch at a time."""

    def begin_epoch(self, windows: np.ndarray, plan: PlanRequest | None = None) -> None:
        """Start fetching the labels of ``windows`` ([n] int64, the rank's plan order).

        ``plan`` names the shard plan those windows come from: a streamed teacher then asks for
        the plan (a few integers) and the server derives the same sequence, instead of receiving
        one range per shuffled window.
        """

    def labels_for(self, index: torch.Tensor, valid: torch.Tensor) -> Labels:
        """The labels of a batch, in its order (zeros for padding samples)."""

    def end_epoch(self) -> list[dict[str, Any]]:
        """Finish the epoch; one delivery record per teacher."""

    def close(self) -> None:
        """Release connections and files."""


def _as_numpy(t: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    return np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=dtype)


class StreamedTeacher:
    """One teacher service, streamed through a ``SoftLabelClient`` (resume, failover, prefetch).

    Exactly once: the client hands over a chunk only after its checksum verified and resumes a
    broken stream at the cursor after the last chunk it received, so an epoch's stream delivers
    each requested window once; :meth:`end_epoch` checks the count and reports it.
    """

    def __init__(self, teacher: TeacherSpec, spec: LabelSpec) -> None:
        assert teacher.kind == "stream", teacher
        self.teacher = teacher
        self.spec = spec
        self.client = label_client(
            teacher.client or spec.client, teacher.location, spec.fingerprint, teacher.version
        )
        self._stream: Any = None
        self._requested = 0
        self._wait = 0.0

    def begin_epoch(self, windows: np.ndarray, plan: PlanRequest | None = None) -> None:
        self.client.stats = ClientStats()  # per-epoch counters (no stream is running now)
        self._requested, self._wait = len(windows), 0.0
        if plan is not None:
            self._stream = self.client.stream_plan(
                self.spec.split, plan, spread=self.spec.spread, hidden=self.spec.hidden
            )
        else:
            self._stream = self.client.stream(
                self.spec.split, windows, spread=self.spec.spread, hidden=self.spec.hidden
            )

    def labels_for(self, index: torch.Tensor, valid: torch.Tensor) -> Labels:
        t0 = time.perf_counter()
        labels: Labels = self._stream.labels_for(index, valid)  # blocks until they have arrived
        self._wait += time.perf_counter() - t0
        return labels

    def end_epoch(self) -> list[dict[str, Any]]:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        s = self.client.stats
        if s.windows != self._requested:
            raise InputError(
                f"the teacher delivered {s.windows} labels for {self._requested} requested windows "
                "in this epoch (every window must arrive exactly once)",
                where=self.teacher.name,
            )
        return [
            {
                "teacher": self.teacher.name,
                "version": self.client.version,
                "requested": self._requested,
                "delivered": s.windows,
                "chunks": s.chunks,
                "bytes": s.bytes,
                "reconnects": s.reconnects,
                "checksum_failures": s.checksum_failures,
                "endpoints": sorted(s.endpoints),
                "wait_s": round(self._wait, 6),
            }
        ]

    def close(self) -> None:
        self.client.close()


class CachedTeacher:
    """One teacher's labels from a label cache (``stkd precompute-labels``).

    Args:
        teacher: a ``cache`` teacher.
        spec: the label spec (split, spread, hidden).
        in_memory: read the whole split into memory once, instead of reading each batch's rows.

    Raises:
        StoreError: the cache holds another teacher than the one checked, or no hidden states
            while ``spec.hidden`` (``distill.loss: hint``).
    """

    def __init__(self, teacher: TeacherSpec, spec: LabelSpec, in_memory: bool = False) -> None:
        assert teacher.kind == "cache", teacher
        self.teacher = teacher
        self.spec = spec
        self.cache = LabelCache(teacher.location)
        if teacher.version and self.cache.version != teacher.version:
            raise StoreError(
                f"the cache now holds teacher {self.cache.version}, expected {teacher.version}",
                where=teacher.name,
            )
        if spec.hidden and not self.cache.hidden_dim:
            raise StoreError(hint_cache_message(), where=teacher.name)
        self.range = self.cache.ranges[spec.split]
        self.shape = self.cache.window_shape
        self._memory: NumpyLabels | None = None
        if in_memory:
            # [windows of split, H, N, C] float32, decoded from the cache's stored label type
            self._memory = self.cache.read_split(
                spec.split, with_spread=spec.spread, with_hidden=spec.hidden
            ).keep(spread=spec.spread, hidden=spec.hidden)
        self._requested = self._delivered = 0
        self._wait = 0.0

    def begin_epoch(self, windows: np.ndarray, plan: PlanRequest | None = None) -> None:
        self._requested, self._delivered, self._wait = len(windows), 0, 0.0

    def _rows(self, idx: np.ndarray) -> NumpyLabels:
        if self._memory is not None:
            r = self.range
            pos = (idx - r.start) // r.step
            ok = (idx >= r.start) & (idx < r.stop) & ((idx - r.start) % r.step == 0)
            if not ok.all():
                raise InputError(
                    f"window {int(idx[~ok][0])} is not in the cache", where=self.teacher.name
                )
            return take_rows(self._memory, pos)
        spec = self.spec
        hit, labels = self.cache.lookup(
            spec.split, idx, with_spread=spec.spread, with_hidden=spec.hidden
        )
        if labels is None or not hit.all():
            raise InputError(
                f"window {int(idx[~hit][0])} is not in the cache", where=self.teacher.name
            )
        return labels.keep(spread=spec.spread, hidden=spec.hidden)

    def labels_for(self, index: torch.Tensor, valid: torch.Tensor) -> Labels:
        t0 = time.perf_counter()
        idx, ok = _as_numpy(index, np.int64), _as_numpy(valid, bool)
        pred = np.zeros((len(idx), *self.shape), dtype=np.float32)  # padding rows stay 0
        hidden_shape = (len(idx), self.shape[1], self.cache.hidden_dim)  # [batch, N, F]
        out = LabelArrays(
            pred,
            np.zeros_like(pred) if self.spec.spread else None,
            np.zeros(hidden_shape, dtype=np.float32) if self.spec.hidden else None,
        )
        if ok.any():
            rows = self._rows(idx[ok]).named()
            for name, a in out.named().items():
                a[ok] = rows[name]
        self._delivered += int(ok.sum())
        self._wait += time.perf_counter() - t0
        return out.map(torch.from_numpy)

    def end_epoch(self) -> list[dict[str, Any]]:
        return [
            {
                "teacher": self.teacher.name,
                "version": self.cache.version,
                "requested": self._requested,
                "delivered": self._delivered,
                "wait_s": round(self._wait, 6),
            }
        ]

    def close(self) -> None:
        self._memory = None


class TeacherEnsemble:
    """Several teachers' labels combined per batch (``distill.ensemble``).

    With one teacher its labels pass through unchanged.
    """

    def __init__(self, sources: Sequence[LabelSource], spec: LabelSpec) -> None:
        if len(sources) != len(spec.teachers):
            raise ConfigError("one label source per teacher", where="teachers")
        self.sources = list(sources)
        self.spec = spec
        self.val_errors = spec.val_errors

    def begin_epoch(self, windows: np.ndarray, plan: PlanRequest | None = None) -> None:
        for s in self.sources:
            s.begin_epoch(windows, plan)

    def labels_for(self, index: torch.Tensor, valid: torch.Tensor) -> Labels:
        got = [s.labels_for(index, valid) for s in self.sources]
        if len(got) == 1:
            return got[0]
        # hidden states of several teachers live in different spaces: LabelSpec refuses them
        preds = [g.prediction for g in got]  # each [batch, H, N, C]
        if self.spec.spread:
            spreads = [g.spread for g in got if g.spread is not None]
            assert len(spreads) == len(got), "spread was requested from every teacher"
            mean, log_var = combine_teachers(
                preds, self.spec.ensemble, self.val_errors, log_vars=spreads
            )
            return LabelArrays(mean, log_var)
        return LabelArrays(combine_teachers(preds, self.spec.ensemble, self.val_errors))

    def end_epoch(self) -> list[dict[str, Any]]:
        return [r for s in self.sources for r in s.end_epoch()]

    def close(self) -> None:
        for s in self.sources:
            s.close()


def open_label_source(spec: LabelSpec, in_memory: bool | None = None) -> TeacherEnsemble:
    """The label source of a rank: every teacher of ``spec``, combined.

    Args:
        in_memory: load cache teachers whole into memory (default: ``spec.in_memory``).
    """
    whole = spec.in_memory if in_memory is None else in_memory
    sources: list[LabelSource] = []
    for t in spec.teachers:
        if t.kind == "stream":
            sources.append(StreamedTeacher(t, spec))
        elif t.kind == "cache":
            sources.append(CachedTeacher(t, spec, in_memory=whole))
        else:
            raise ConfigError("replicas must be started by the driver first", where=t.name)
    return TeacherEnsemble(sources, spec)
