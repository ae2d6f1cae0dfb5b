"""Write-through: labels the teacher computes while serving are stored in the label cache.

The server's batching thread hands each batch to :class:`WriteBehind` and goes on; a background
thread writes them with :meth:`LabelCache.write` (data rows first, ``filled`` flags after) and
adds them to the cache's ``forward_windows`` count.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from stkd_dist.serving.cache import LabelCache

log = logging.getLogger(__name__)


class WriteBehind:
    """Writes labels to a cache from a background thread (write-through serving).

    The server's batching thread hands each batch over and goes on; a bounded queue keeps memory
    bounded (the batching thread waits when the disk falls far behind).

    Args:
        cache: a cache opened with ``mode="r+"``.
        max_pending: most batches waiting to be written.
    """

    def __init__(self, cache: LabelCache, max_pending: int = 64) -> None:
        self.cache = cache
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] = (
            queue.Queue(max_pending)
        )
        self._forward = 0
        self._thread = threading.Thread(target=self._run, name="stkd-cache-writer", daemon=True)
        self._thread.start()

    def put(self, indices: np.ndarray, prediction: np.ndarray, spread: np.ndarray | None) -> None:
        """Queue labels of freshly computed windows for writing."""
        self._queue.put((indices, prediction, spread))

    def flush(self) -> None:
        """Wait until every queued batch is written and the forward count recorded."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, record the forward count, stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                indices, prediction, spread = item
                self.cache.write(indices, prediction, spread)
                # the teacher ran on these windows to fill the cache
                self.cache.add_forward_windows(len(indices))
            except Exception:  # a failed write loses cache rows, never served labels
                log.exception("write-through to %s failed", self.cache.path)
            finally:
                self._queue.task_done()
