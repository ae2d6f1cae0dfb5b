"""Write-through: labels the teacher computes while serving are stored in the label cache.

The server's batching thread hands each batch to :class:`WriteBehind` and goes on; a background
thread writes them with :meth:`LabelCache.write` and records the teacher forward passes in the
cache's ``forward_windows`` count.

Several replicas may write through to one cache (a shared folder or object-store prefix): a
replica writes only objects of its own (fragments of incomplete chunks, its forward count) or
whole chunks followed by their done marker, so no replica can corrupt another's rows (see
:mod:`stkd_dist.serving.cache`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.label_arrays import NumpyLabels

log = logging.getLogger(__name__)

# the forward count is one object rewritten whole: at most once per this many seconds while
# batches keep coming (and whenever the queue runs empty), not once per batch
COUNT_EVERY_S = 5.0


class WriteBehind:
    """Writes labels to a cache from a background thread (write-through serving).

    The server's batching thread hands each batch over and goes on; a bounded queue keeps memory
    bounded (the batching thread waits when the store falls far behind).

    Args:
        cache: a cache opened with ``mode="r+"``.
        max_pending: most batches waiting to be written.
    """

    def __init__(self, cache: LabelCache, max_pending: int = 64) -> None:
        self.cache = cache
        self._queue: queue.Queue[tuple[np.ndarray, NumpyLabels] | None] = queue.Queue(max_pending)
        self._uncounted = 0
        self._counted_at = time.monotonic()
        # batches handed over / written (or failed) so far; streams wait on `_written` so that
        # labels are stored before they are sent (see `written_through`)
        self._put = 0
        self._written = 0
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stkd-cache-writer", daemon=True)
        self._thread.start()

    def put(self, indices: np.ndarray, labels: NumpyLabels) -> None:
        """Queue labels of freshly computed windows for writing (with the hidden states when the
        cache stores them: the server's batcher then computes them for every batch)."""
        with self._progress:
            self._put += 1
        self._queue.put((indices, labels))

    @property
    def handed_over(self) -> int:
        """Batches handed to :meth:`put` so far."""
        with self._progress:
            return self._put

    def written_through(self, batches: int, timeout: float | None = None) -> bool:
        """Wait until the first ``batches`` batches handed over are written (or their write
        failed, which is logged); False on timeout.

        A stream calls this before sending labels the teacher just computed: a window a student
        has received is then in the cache, so a replica asked for it later (the next epoch, on
        another replica) reads it instead of computing it again.
        """
        with self._progress:
            return self._progress.wait_for(lambda: self._written >= batches, timeout)

    def flush(self) -> None:
        """Wait until every queued batch is written and the forward count recorded."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, record the forward count, stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _record_count(self, force: bool) -> None:
        """Record the forward windows not recorded yet (now, or when it is time)."""
        due = time.monotonic() - self._counted_at >= COUNT_EVERY_S
        if self._uncounted and (force or due):
            n, self._uncounted = self._uncounted, 0
            self._counted_at = time.monotonic()
            try:
                self.cache.add_forward_windows(n)
            except Exception:  # a lost count loses bookkeeping, never labels
                log.exception("recording forward windows in %s failed", self.cache.path)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    self._record_count(force=True)
                    return
                indices, labels = item
                self.cache.write(indices, labels)
                # the teacher ran on these windows to fill the cache
                self._uncounted += len(indices)
            except Exception:  # a failed write loses cache rows, never served labels
                log.exception("write-through to %s failed", self.cache.path)
            finally:
                # before task_done: flush() returns only once the count is recorded too
                if item is not None:
                    self._record_count(force=self._queue.empty())
                    with self._progress:
                        self._written += 1
                        self._progress.notify_all()
                self._queue.task_done()
