"""How loaded a teacher server is: admitted streams and the windows they still owe.

Clients place every new stream on the replica with the fewest outstanding windows (see
:mod:`~stkd_dist.serving.placement`), and the autoscaler removes replicas that have been idle for
a while; both read these numbers through ``Describe``
(:attr:`TeacherInfo.outstanding_windows <stkd_dist.serving.proto_gen.teacher_pb2.TeacherInfo>`
and the fields after it).

Outstanding windows, not streams, because streams differ in length by orders of magnitude: an epoch
of a rank is thousands of windows, a ``describe`` probe or a resumed tail a handful.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadSnapshot:
    """A server's load at one moment.

    Attributes:
        active_streams: streams admitted and not yet ended.
        max_streams: most streams it admits.
        outstanding_windows: windows its active streams have still to send.
        streams_served: streams admitted since it started.
        idle_s: seconds since its last stream ended (0 while any is active).
    """

    active_streams: int
    max_streams: int
    outstanding_windows: int
    streams_served: int
    idle_s: float


class StreamLoad:
    """Admission of streams (at most ``max_streams``) and their outstanding windows.

    Thread-safe: every stream handler thread calls :meth:`acquire`, then :meth:`progress` after
    each chunk it sent, then :meth:`release` once, whatever way it ended.
    """

    def __init__(self, max_streams: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_streams = max_streams
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._outstanding = 0
        self._served = 0
        self._since = clock()  # when the server last became idle (or started)

    def acquire(self) -> bool:
        """Admit a stream; False when ``max_streams`` are active (the caller refuses it)."""
        with self._lock:
            if self._active >= self.max_streams:
                return False
            self._active += 1
            self._served += 1
            return True

    def progress(self, windows: int) -> None:
        """A stream's windows still to send changed by ``windows`` (+ when its plan is known,
        - as chunks go out)."""
        with self._lock:
            self._outstanding += windows

    def release(self, unsent: int = 0) -> None:
        """A stream ended with ``unsent`` of its windows not sent (broken or cancelled)."""
        with self._lock:
            self._active -= 1
            self._outstanding -= unsent
            if self._active == 0:
                self._since = self._clock()
                self._idle.notify_all()

    @property
    def active(self) -> int:
        return self._active

    def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every stream to end; returns the streams left."""
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0, timeout=timeout)
            return self._active

    def snapshot(self) -> LoadSnapshot:
        with self._lock:
            idle = 0.0 if self._active else max(self._clock() - self._since, 0.0)
            return LoadSnapshot(
                active_streams=self._active,
                max_streams=self.max_streams,
                outstanding_windows=max(self._outstanding, 0),
                streams_served=self._served,
                idle_s=idle,
            )
