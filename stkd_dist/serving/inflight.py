"""Bookkeeping of the batcher: requests, batches in flight and the LRU of recent batches.

None of these classes locks: the :class:`~stkd_dist.serving.batcher.Batcher` calls them under its
one condition lock, from the stream threads (submit), the collecting thread and the forward
thread.

Hidden states (the teacher's ``[n, N, F]`` representation) are computed only by batches that a
request wanting them waits on (:attr:`InflightBatch.hidden`); a request that wants them is never
served by a batch, in flight or recent, that computed none.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from stkd_dist.serving.label_arrays import NumpyLabels, allocate_like, label_bytes, take_rows


@dataclass(eq=False)  # identity semantics: requests are dict keys of the batches they wait on
class Request:
    """One ``submit``: its windows, how far they got and where their labels go.

    Attributes:
        indices: ``[n]`` int64 windows, in the order the caller wants their labels.
        future: resolves to their labels (prediction and spread ``[n, H, N, C]``; hidden states
            ``[n, N, F]`` when ``hidden``).
        hidden: the request wants the teacher's hidden states.
        taken: windows handed to a batch (or served from the recent LRU) so far.
        done: windows whose labels are in place.
        finished: the future's outcome is decided (resolved or failed; set once).
        out: the labels, allocated with the first rows placed.
    """

    indices: np.ndarray
    future: Future[NumpyLabels]
    hidden: bool = False
    taken: int = 0
    done: int = 0
    finished: bool = False
    out: NumpyLabels | None = None

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def put(self, positions: np.ndarray, labels: NumpyLabels) -> bool:
        """Place the labels of ``positions`` ``[k]`` (rows in that order; hidden states only when
        the request wants them); True when that completed it."""
        if self.finished:  # failed by another batch: its labels are not wanted any more
            return False
        labels = labels.keep(spread=True, hidden=self.hidden)
        if self.out is None:
            self.out = allocate_like(self.size, labels)
        for name, rows in self.out.named().items():
            rows[positions] = labels.named()[name]
        self.done += len(positions)
        if self.done == self.size:
            self.finished = True
            return True
        return False

    def fail(self) -> bool:
        """Mark it failed; True unless its outcome was decided already."""
        if self.finished:
            return False
        self.finished = True
        return True

    def labels(self) -> NumpyLabels:
        assert self.out is not None
        return self.out


class InflightBatch:
    """Distinct windows computed in one forward pass, and the requests waiting for them.

    Built by the collecting thread (:meth:`add`, :meth:`wait`, then :meth:`seal`); while it is in
    flight other requests may still :meth:`wait` on its windows; the forward thread then takes the
    waiters and :meth:`fill` copies their rows.

    ``hidden``: the forward pass also computes the hidden states; set (under the batcher's lock)
    while the batch is being collected, when a request that wants them waits on it, and fixed
    once it is handed to the forward thread.
    """

    def __init__(self, seq: int, hidden: bool = False) -> None:
        self.seq = seq
        self.hidden = hidden
        self._fresh: list[int] = []
        self.indices = np.empty(0, dtype=np.int64)  # [u] sorted, set by seal()
        self._row: dict[int, int] = {}
        self._waiters: dict[Request, tuple[list[int], list[int]]] = {}
        self.labels: NumpyLabels | None = None

    @property
    def size(self) -> int:
        return len(self._fresh)

    @property
    def n_requests(self) -> int:
        """Requests waiting on this batch so far."""
        return len(self._waiters)

    @property
    def nbytes(self) -> int:
        return 0 if self.labels is None else label_bytes(self.labels)

    def serves(self, req: Request) -> bool:
        """Whether this batch's labels are all ``req`` wants (hidden states when it wants them)."""
        return self.hidden or not req.hidden

    def add(self, window: int) -> None:
        """Compute ``window`` in this batch."""
        self._fresh.append(window)

    def wait(self, req: Request, position: int, window: int) -> None:
        """``req`` wants this batch's labels of ``window`` at ``position``."""
        positions, windows = self._waiters.setdefault(req, ([], []))
        positions.append(position)
        windows.append(window)

    def seal(self) -> InflightBatch:
        """Fix the windows: sorted, so that reading them walks the store forwards."""
        self.indices = np.sort(np.asarray(self._fresh, dtype=np.int64))
        self._row = {w: i for i, w in enumerate(self.indices.tolist())}
        return self

    def take_waiters(self) -> dict[Request, tuple[list[int], list[int]]]:
        """The waiting requests (and forget them: the batch keeps only its labels)."""
        waiters, self._waiters = self._waiters, {}
        return waiters

    def fill(self, req: Request, positions: Sequence[int], windows: Sequence[int]) -> bool:
        """Copy this batch's labels of ``windows`` into ``req`` at ``positions``; True when that
        completed ``req``."""
        assert self.labels is not None
        rows = [self._row[w] for w in windows]
        return req.put(np.asarray(positions, dtype=np.int64), take_rows(self.labels, rows))


class RecentBatches:
    """An LRU of computed batches, at most ``max_bytes`` of labels: repeats are served from it.

    A hit refreshes the whole batch it belongs to (windows of one batch are usually wanted
    together: the same stretch of an epoch read by another stream).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._batches: OrderedDict[int, InflightBatch] = OrderedDict()
        self._where: dict[int, InflightBatch] = {}  # window -> the batch holding its labels
        self._bytes = 0

    def get(self, window: int) -> InflightBatch | None:
        """The batch holding ``window``'s labels, or None."""
        batch = self._where.get(window)
        if batch is not None:
            self._batches.move_to_end(batch.seq)
        return batch

    def add(self, batch: InflightBatch) -> None:
        """Keep ``batch`` (with its labels), dropping the least recently used past the budget."""
        size = batch.nbytes
        if size == 0 or size > self.max_bytes:
            return
        self._batches[batch.seq] = batch
        for w in batch.indices.tolist():
            self._where[w] = batch
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._batches.popitem(last=False)
            for w in old.indices.tolist():
                if self._where.get(w) is old:
                    del self._where[w]
            self._bytes -= old.nbytes
