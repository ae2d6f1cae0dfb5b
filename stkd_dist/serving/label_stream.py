"""The consumer side of one label stream: a bounded prefetch queue and the join with batches.

A :class:`LabelStream` runs a fetch function (:meth:`SoftLabelClient._fetch`: one gRPC stream
per request, resumed on failures) in a background thread that puts the verified chunks into a
queue of at most ``prefetch`` chunks: the consumer does not wait while the teacher keeps up, and
memory stays bounded when it does not (the thread waits for room).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import torch

from stkd_dist.errors import InputError
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels, take_rows
from stkd_dist.serving.proto_gen import teacher_pb2 as pb

# one item of a stream: window indices [n] and their labels (prediction [n, H, N, C]; spread and
# hidden [n, N, F] when requested)
LabelItem = tuple[np.ndarray, NumpyLabels]
# fetch(request, stream) yields the verified chunks of one request, resuming as needed
FetchFn = Callable[[pb.LabelRequest, "LabelStream"], Iterator[LabelItem]]


_DONE = object()


class LabelStream:
    """Labels streamed in the background, consumed in order.

    Iterate it for ``(indices, labels)`` chunks, or call :meth:`labels_for` with each
    batch's window indices. Close it (or use it as a context manager) to stop early.

    Args:
        fetch: yields the chunks of one request (run in the background thread).
        requests: the requests whose chunks make up the stream, in order.
        total: windows in the stream, when known.
        prefetch: most chunks buffered ahead of the consumer.
    """

    def __init__(
        self, fetch: FetchFn, requests: list[pb.LabelRequest], total: int | None, prefetch: int
    ) -> None:
        self._fetch = fetch
        self.total = total
        self.closed = False
        self.call: grpc.Call | None = None
        self._queue: queue.Queue[Any] = queue.Queue(prefetch)
        # window -> its labels (one window each, [H, N, C] / [N, F]), in arrival order
        self._buffer: dict[int, deque[NumpyLabels]] = defaultdict(deque)
        self._exhausted = False
        # zeros shaped like one window's labels, with the outputs that come: for padding samples
        self._template: NumpyLabels | None = None
        self._thread = threading.Thread(
            target=self._produce, args=(requests,), name="stkd-labels", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self.closed:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, requests: list[pb.LabelRequest]) -> None:
        try:
            for item in itertools.chain.from_iterable(self._fetch(r, self) for r in requests):
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Iterator[LabelItem]:
        return self

    def __next__(self) -> LabelItem:
        if self._exhausted:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._exhausted = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._exhausted = True
            self.close()
            raise item
        return item

    def labels_for(
        self, index: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray | None = None
    ) -> LabelArrays[torch.Tensor]:
        """Labels of a batch's windows, in the batch's order.

        Chunks are read from the stream until every window of ``index`` (where ``valid``) has
        arrived; each streamed window is handed out once. Padding samples (``valid`` False) get
        zeros: their loss mask is empty.

        Args:
            index: ``[batch]`` window indices (``WindowBatch.index``).
            valid: ``[batch]`` bool (``WindowBatch.valid``), default all True.

        Returns:
            ``prediction`` ``[batch, H, N, C]`` float32, and ``spread`` ``[batch, H, N, C]`` and
            ``hidden`` ``[batch, N, F]`` when the stream carries them.

        Raises:
            InputError: a window is not in the rest of the stream.
        """
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64)
        ok = (
            np.ones(len(idx), dtype=bool)
            if valid is None
            else np.asarray(valid.cpu() if isinstance(valid, torch.Tensor) else valid, bool)
        )
        needed: defaultdict[int, int] = defaultdict(int)
        for w in idx[ok]:
            needed[int(w)] += 1
        while any(len(self._buffer.get(w, ())) < n for w, n in needed.items()):
            try:
                indices, labels = next(self)
            except StopIteration:
                missing = [w for w, n in needed.items() if len(self._buffer.get(w, ())) < n]
                raise InputError(
                    f"window {missing[0]} is not in the rest of the label stream",
                    where="labels_for",
                ) from None
            if self._template is None and len(indices):
                self._template = labels.map(lambda a: np.zeros_like(a[0]))
            for i, w in enumerate(indices.tolist()):
                self._buffer[w].append(take_rows(labels, i))  # views of one window
        rows = [self._buffer[int(w)].popleft() if o else None for w, o in zip(idx, ok, strict=True)]
        for w in needed:
            if not self._buffer[w]:
                del self._buffer[w]
        if self._template is None:
            raise InputError("no labels have arrived yet to shape padding by", where="labels_for")
        zeros = self._template.named()
        stacked = {
            name: torch.from_numpy(
                np.stack([r.named()[name] if r is not None else zero for r in rows])
            )
            for name, zero in zeros.items()
        }
        return LabelArrays.from_named(stacked)

    def close(self) -> None:
        """Stop the background reader (cancels the call in progress)."""
        if self.closed:
            return
        self.closed = True
        call = self.call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> LabelStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
