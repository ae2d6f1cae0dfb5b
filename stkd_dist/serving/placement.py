"""Where a client's next stream goes: the known replica with the fewest outstanding windows.

:class:`Placement` keeps the replicas an :class:`~stkd_dist.serving.discovery.EndpointSource`
resolves to, resolves it again every ``discovery_s`` seconds (a replica started mid-run gets
streams without any failure having happened), and for every new stream asks each known replica
for its load (``Describe``, in parallel, with a short timeout) and picks:

1. replicas that answered and have a free stream slot, fewest outstanding windows first (ties:
   fewest active streams, then round robin from a random start, so that clients starting
   together spread out);
2. when every replica that answered is full: :class:`AllFull`, and the caller waits for a slot
   (admission is a queue, never a failure of the run);
3. when none answered: the next one round robin, so that the stream attempt itself reports
   the error and the client's backoff and failover apply as before.

A replica the caller just failed on is excluded from the next pick when there is another one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

from stkd_dist.errors import ConfigError
from stkd_dist.serving.client_options import Backoff, TeacherUnavailableError
from stkd_dist.serving.discovery import Endpoint, EndpointSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica answered about its load (``Describe``)."""

    active_streams: int
    max_streams: int
    outstanding_windows: int

    @property
    def full(self) -> bool:
        # max_streams 0: a server from before load reporting; it admits whatever it admits
        return self.max_streams > 0 and self.active_streams >= self.max_streams


class AllFull(Exception):
    """Every replica that answered has ``max_streams`` active streams."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        super().__init__(", ".join(e.address for e in endpoints))
        self.endpoints = tuple(endpoints)


#: a probe asks one replica for its load; None = it did not answer
Probe = Callable[[Endpoint], "ReplicaLoad | None"]


class Placement:
    """The replicas of one endpoint source, and which one gets the next stream.

    Args:
        source: where the replicas are.
        probe: asks a replica for its load (None when it does not answer in time).
        discovery_s: seconds after which the source is resolved again on the next pick.
        clock: monotonic clock (tests).
    """

    def __init__(
        self,
        source: EndpointSource,
        probe: Probe,
        discovery_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.probe = probe
        self.discovery_s = discovery_s
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: list[Endpoint] = []
        self._resolved_at = -float("inf")
        self._next = random.randrange(1 << 16)
        # replicas that did not answer a probe, until when they are not probed again: a stopped
        # replica would otherwise cost a probe timeout on every stream opened
        self._quiet: dict[Endpoint, float] = {}
        self.tried: dict[str, None] = {}  # every address a stream was placed on, in order

    @property
    def endpoints(self) -> list[Endpoint]:
        """The replicas known now (as last resolved)."""
        with self._lock:
            return list(self._endpoints)

    def refresh(self, force: bool = False) -> list[Endpoint]:
        """Resolve the source again when ``force`` or ``discovery_s`` passed; keeps the last
        known replicas when resolving fails and some are known."""
        with self._lock:
            due = force or self._clock() - self._resolved_at >= self.discovery_s
            if not due and self._endpoints:
                return list(self._endpoints)
        try:
            found = self.source.resolve()
        except ConfigError:
            with self._lock:
                if not self._endpoints:
                    raise
                return list(self._endpoints)
        with self._lock:
            new = [e for e in found if e not in self._endpoints]
            if new and self._endpoints:
                log.info("teacher replicas found: %s", ", ".join(e.address for e in new))
            self._endpoints = list(found)
            self._resolved_at = self._clock()
            return list(self._endpoints)

    def pick(
        self, exclude: Sequence[Endpoint] = (), refresh: bool = False, hint: int | None = None
    ) -> Endpoint:
        """The replica for the next stream (see the module docstring).

        ``hint`` (a rank) replaces the round-robin start among equally loaded replicas: the
        ranks of a DDP group open their streams in the same millisecond, before any replica's
        load shows the others', and rank ``r`` taking the ``r``-th spreads them anyway.

        Raises:
            AllFull: every replica that answered is full.
            LookupError: no replica is known (the source resolved to none).
        """
        known = self.refresh(force=refresh)
        if not known:
            raise LookupError("no teacher replica found")
        candidates = [e for e in known if e not in exclude] or known
        now = self._clock()
        with self._lock:
            awake = [e for e in candidates if self._quiet.get(e, -float("inf")) <= now]
        candidates = awake or candidates
        loads = self._probe_all(candidates)
        with self._lock:
            for e, load in zip(candidates, loads, strict=True):
                if load is None:
                    self._quiet[e] = now + self.discovery_s
                else:
                    self._quiet.pop(e, None)
        answered = [(e, load) for e, load in zip(candidates, loads, strict=True) if load]
        free = [(e, load) for e, load in answered if not load.full]
        with self._lock:
            start, self._next = self._next, self._next + 1
        if hint is not None:
            start = hint
        n = len(candidates)
        if free:
            # ties go round robin from a random start, so clients starting together spread out
            order = {e: (i - start) % n for i, e in enumerate(candidates)}
            best = min(
                free,
                key=lambda el: (el[1].outstanding_windows, el[1].active_streams, order[el[0]]),
            )[0]
        elif answered:
            raise AllFull([e for e, _ in answered])
        else:
            best = candidates[start % n]
        with self._lock:
            self.tried.setdefault(best.address)
        return best

    def place(
        self,
        exclude: Sequence[Endpoint] = (),
        refresh: bool = False,
        hint: int | None = None,
        *,
        backoff: Backoff,
        timeout_s: float,
        on_wait: Callable[[], None] = lambda: None,
    ) -> Endpoint:
        """:meth:`pick`, waiting (with ``backoff``, ``on_wait`` called each time) while every
        replica is full: admission is a queue, slots free up as other streams end.

        Raises:
            TeacherUnavailableError: every replica stayed full for ``timeout_s`` seconds.
            LookupError: no replica is known.
        """
        started = time.monotonic()
        waits = 0
        while True:
            try:
                return self.pick(exclude, refresh, hint)
            except AllFull as full:
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise TeacherUnavailableError(
                        f"every teacher replica ({full}) has been full (its max_streams) for "
                        f"{waited:.0f} s; start more replicas (serve.replicas, serve.autoscale) "
                        "or admit more streams per replica (serve.max_streams)",
                        where=str(self.source.spec),
                    ) from None
                waits += 1
                on_wait()
                if waits == 1:
                    log.info("every replica is full (%s); waiting for a free stream slot", full)
                time.sleep(backoff.delay(min(waits, 6)))

    def _probe_all(self, endpoints: list[Endpoint]) -> list[ReplicaLoad | None]:
        if len(endpoints) == 1:
            return [self._safe_probe(endpoints[0])]
        # in parallel: a stopped replica costs one probe timeout, not one per replica
        with futures.ThreadPoolExecutor(min(len(endpoints), 16)) as pool:
            return list(pool.map(self._safe_probe, endpoints))

    def _safe_probe(self, ep: Endpoint) -> ReplicaLoad | None:
        try:
            return self.probe(ep)
        except Exception as e:  # a replica that cannot answer is simply not a candidate
            log.debug("load probe of %s failed: %s", ep.address, e)
            return None
