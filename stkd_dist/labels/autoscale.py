"""Autoscaling of the teacher replicas from the students' backlog (``serve.autoscale``).

The signal is the share of the students' step time spent waiting for soft labels: a student that
never waits gains nothing from another replica, one that waits half of each step would run up to
twice as fast. The pieces:

* :class:`WaitReporter` (each student worker) sums its waits and step times and sends them, at
  most once a second, fire-and-forget, to a named :class:`WaitMeter` Ray actor;
* :class:`WaitMeter` (the actor) sums the reports of every rank until the autoscaler takes them;
* :func:`decide` (pure) turns one interval's share, the fleet size and its idle replicas into an
  action: add, remove or hold;
* :class:`Autoscaler` (the driver) takes the meter's sums every ``interval_s``, decides, acts on a
  :class:`FleetOps` (the replicas) and keeps a timeline of every decision for ``metrics.json``
  (``labels.replicas_timeline``).

Nothing here may stop training: a missing meter turns the reporters into no-ops and a failed
action is recorded as a ``hold`` with the error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

from stkd_dist.config.pipeline import AutoscaleSection
from stkd_dist.serving.metrics import log_event

log = logging.getLogger(__name__)

Action = Literal["start", "add", "remove", "hold"]
Clock = Callable[[], float]


@dataclass(frozen=True)
class ScaleDecision:
    """One entry of the replicas' timeline.

    Attributes:
        t_s: seconds since the autoscaler started.
        action: ``start`` (the initial size), ``add``, ``remove`` or ``hold``.
        replicas: replicas after the action.
        wait_share: the students' share of step time spent waiting for labels over the interval;
            None when no student step was measured in it.
        reason: why, in words, with the numbers that led to it.
        replica: the name of the replica added or removed, else None.
    """

    t_s: float
    action: Action
    replicas: int
    wait_share: float | None
    reason: str
    replica: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times rounded to the millisecond, the share to 4 digits)."""
        out = asdict(self)
        out["t_s"] = round(self.t_s, 3)
        if self.wait_share is not None:
            out["wait_share"] = round(self.wait_share, 4)
        return out


def _decide(
    policy: AutoscaleSection,
    replicas: int,
    wait_share: float | None,
    idle: Sequence[str],
    can_add: bool,
) -> tuple[Action, str | None, str, str]:
    """:func:`decide` plus a stable code per branch (what repeated holds are compared by: the
    reasons carry numbers that change every interval)."""
    if replicas < policy.min:
        # a replica died or failed to start: restoring the floor needs no backlog
        if can_add:
            return "add", None, f"{replicas} replicas < serve.autoscale.min ({policy.min})", "min"
        return "hold", None, "below serve.autoscale.min but the cluster has no room", "min_room"
    if wait_share is None:
        if replicas <= policy.min:
            return "hold", None, "no student step measured; at serve.autoscale.min", "none_min"
        if not idle:
            return "hold", None, "no student step measured; no replica idle", "none_busy"
        return (
            "remove",
            idle[0],
            f"no student step measured; {idle[0]} served no stream for {policy.idle_s:g}s",
            "none_idle",
        )
    share = f"students waited {wait_share:.1%} of step time"
    if wait_share > policy.target_wait:
        above = f"{share} > target {policy.target_wait:.1%}"
        if replicas >= policy.max:
            return "hold", None, f"{above}; at serve.autoscale.max ({policy.max})", "max"
        if not can_add:
            return (
                "hold",
                None,
                f"{above}; cluster has no room for another replica (CPUs/GPUs)",
                "room",
            )
        return "add", None, above, "add"
    # hysteresis: shrink only well below the target, so that removing a replica does not push
    # the share straight back above it and make the fleet oscillate
    low = policy.target_wait / 2
    if wait_share > low:
        return "hold", None, f"{share}, between {low:.1%} and {policy.target_wait:.1%}", "band"
    if replicas <= policy.min:
        return "hold", None, f"{share}; at serve.autoscale.min ({policy.min})", "min_low"
    if not idle:
        return "hold", None, f"{share}; no replica idle for {policy.idle_s:g}s", "busy"
    return (
        "remove",
        idle[0],
        f"{share} <= {low:.1%}; {idle[0]} served no stream for {policy.idle_s:g}s",
        "idle",
    )


def decide(
    policy: AutoscaleSection,
    *,
    replicas: int,
    wait_share: float | None,
    idle: Sequence[str],
    can_add: bool,
) -> tuple[Action, str | None, str]:
    """The action for one interval: ``(action, replica or None, reason)``.

    * no student step measured (``wait_share`` None): remove the first idle replica above
      ``min``, else hold;
    * share above ``target_wait``: add one below ``max`` when the cluster has room, else hold;
    * share at most ``target_wait / 2`` (hysteresis): remove the first idle replica above
      ``min``, else hold;
    * otherwise hold.

    ``idle`` lists the replicas that served no stream for ``policy.idle_s`` seconds; a busy
    replica is never removed. Below ``min`` (a replica was lost) a replica is added whatever the
    share. ``action`` is ``add``, ``remove`` or ``hold``; the replica is named for ``remove``.
    """
    action, replica, reason, _ = _decide(policy, replicas, wait_share, idle, can_add)
    return action, replica, reason


class WaitMeter:
    """Sums the students' waits and step times between two takes (a named Ray actor).

    The caller makes it an actor (``ray.remote(WaitMeter).options(name=...).remote()``); the
    plain class also works in-process. A lock keeps it correct when called from threads (Ray
    runs a sync actor's methods one at a time, so it never contends there).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wait_s = 0.0
        self._step_s = 0.0
        self._reports = 0

    def record(self, rank: int, wait_s: float, step_s: float) -> None:
        """Add one report of rank ``rank``: seconds waited for labels within ``step_s`` seconds of
        steps. Non-finite or negative values are dropped (a bad clock must not skew the share)."""
        del rank  # the share is over all ranks; the rank is in the signature for tracing
        if not (math.isfinite(wait_s) and math.isfinite(step_s)) or wait_s < 0 or step_s < 0:
            return
        with self._lock:
            self._wait_s += wait_s
            self._step_s += step_s
            self._reports += 1

    def take(self) -> tuple[float, float, int]:
        """``(wait_s, step_s, reports)`` summed since the last take, and reset."""
        with self._lock:
            out = (self._wait_s, self._step_s, self._reports)
            self._wait_s, self._step_s, self._reports = 0.0, 0.0, 0
        return out


def _ray_lookup(name: str, namespace: str | None) -> Any:
    import ray

    return ray.get_actor(name, namespace=namespace)


class WaitReporter:
    """A student's side of the meter: sums its steps and sends them at most every ``every_s``.

    Args:
        meter_name: name of the :class:`WaitMeter` actor; None = autoscaling is off (no-op).
        namespace: its Ray namespace (None = the job's).
        every_s: least seconds between two sends (bounds the actor calls per worker).
        clock: the time source (monotonic seconds).
        rank: this worker's rank, sent with each report.
        lookup: ``(name, namespace) -> actor handle``; default ``ray.get_actor``.

    ``step_s`` must include ``wait_s``: the share is ``wait_s / step_s``. Sends are
    fire-and-forget (the result is never awaited), and if the meter cannot be found or called,
    the reporter logs it once at debug and does nothing more: a student must never fail or slow
    down because the autoscaler is gone.
    """

    def __init__(
        self,
        meter_name: str | None,
        namespace: str | None = None,
        every_s: float = 1.0,
        clock: Clock = time.monotonic,
        *,
        rank: int = 0,
        lookup: Callable[[str, str | None], Any] = _ray_lookup,
    ) -> None:
        self._name = meter_name
        self._namespace = namespace
        self._every_s = every_s
        self._clock = clock
        self._rank = rank
        self._lookup = lookup
        self._actor: Any = None
        self._off = meter_name is None
        self._wait_s = 0.0
        self._step_s = 0.0
        self._last = clock()

    @property
    def active(self) -> bool:
        """False once the reporter is a no-op (no meter configured, or the meter is gone)."""
        return not self._off

    def step(self, wait_s: float, step_s: float) -> None:
        """Account one step; send the sums when ``every_s`` passed since the last send."""
        if self._off:
            return
        self._wait_s += wait_s
        self._step_s += step_s
        if self._clock() - self._last >= self._every_s:
            self.flush()

    def flush(self) -> None:
        """Send what was accumulated now (e.g. at the end of an epoch)."""
        if self._off:
            return
        self._last = self._clock()
        if self._step_s <= 0 and self._wait_s <= 0:
            return
        wait_s, step_s = self._wait_s, self._step_s
        self._wait_s = self._step_s = 0.0
        try:
            if self._actor is None:
                self._actor = self._lookup(self._name, self._namespace)  # type: ignore[arg-type]
            # the ObjectRef is dropped on purpose: waiting on it would put the actor's latency
            # in the student's step
            self._actor.record.remote(self._rank, wait_s, step_s)
        except Exception as exc:
            self._off = True
            log.debug("wait meter %r unavailable, reporting stops: %s", self._name, exc)


class FleetOps(Protocol):
    """What the autoscaler needs from the replicas (implemented over the replica actors)."""

    def size(self) -> int:
        """Replicas running now."""
        ...

    def add(self) -> str:
        """Start a replica; returns its name. Raises when it cannot be placed or started."""
        ...

    def remove(self, name: str) -> None:
        """Drain replica ``name`` (let its streams end or move) and stop it."""
        ...

    def idle(self, idle_s: float) -> list[str]:
        """Replicas that served no stream for ``idle_s`` seconds, the best to remove first."""
        ...

    def can_add(self) -> bool:
        """Whether the cluster has the free CPUs / GPUs of one more replica."""
        ...


class Autoscaler:
    """Grows and shrinks a fleet of replicas every ``policy.interval_s`` (see :func:`decide`).

    Args:
        policy: the ``serve.autoscale`` section.
        fleet: the replicas.
        take_wait: returns ``(wait_s, step_s, reports)`` since its last call (usually
            ``WaitMeter.take`` through the actor).
        clock: the time source of the timeline (monotonic seconds).
        log: the logger of the decisions.

    :meth:`tick` makes one decision (tests drive it directly); :meth:`start` / :meth:`stop` (or
    ``with``) run it in a daemon thread. Every decision is kept in :attr:`timeline`; all are
    logged except a hold identical to the decision before it.
    """

    def __init__(
        self,
        policy: AutoscaleSection,
        fleet: FleetOps,
        take_wait: Callable[[], tuple[float, float, int]],
        *,
        clock: Clock = time.monotonic,
        log: logging.Logger = log,
    ) -> None:
        self.policy = policy
        self._fleet = fleet
        self._take_wait = take_wait
        self._clock = clock
        self._log = log
        self._t0 = clock()
        self._lock = threading.Lock()  # guards the timeline
        self._tick_lock = threading.Lock()  # one decision at a time (thread and callers)
        self._timeline: list[ScaleDecision] = []
        self._last_key: tuple[str, int, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def timeline(self) -> tuple[ScaleDecision, ...]:
        """Every decision so far, oldest first (a copy)."""
        with self._lock:
            return tuple(self._timeline)

    def _record(self, decision: ScaleDecision, key: str) -> ScaleDecision:
        with self._lock:
            self._timeline.append(decision)
        # a steady fleet holds every interval: log a hold only when something changed
        full_key = (decision.action, decision.replicas, key)
        if decision.action != "hold" or full_key != self._last_key:
            share = "n/a" if decision.wait_share is None else f"{decision.wait_share:.3f}"
            log_event(
                self._log,
                "autoscale",
                action=decision.action,
                replicas=decision.replicas,
                wait_share=share,
                replica=decision.replica or "-",
                reason=decision.reason,
            )
        self._last_key = full_key
        return decision

    def _hold(self, replicas: int, share: float | None, reason: str, key: str) -> ScaleDecision:
        t = self._clock() - self._t0
        return self._record(ScaleDecision(t, "hold", replicas, share, reason), key)

    def tick(self) -> ScaleDecision:
        """Measure, decide and act once; returns the decision (never raises)."""
        with self._tick_lock:
            return self._tick()

    def _tick(self) -> ScaleDecision:
        p = self.policy
        share: float | None = None
        with self._lock:
            # what an error is recorded with: the last size known
            replicas = self._timeline[-1].replicas if self._timeline else 0
        try:
            wait_s, step_s, reports = self._take_wait()
            share = wait_s / step_s if reports and step_s > 0 else None
            replicas = self._fleet.size()
            # can_add may query the cluster's resources: only ask when growing is an option
            grow = replicas < p.min or (
                share is not None and share > p.target_wait and replicas < p.max
            )
            can_add = self._fleet.can_add() if grow else False
            idle = self._fleet.idle(p.idle_s)
        except Exception as exc:
            # an unreadable meter or fleet must not change the fleet: hold and retry next time
            return self._hold(replicas, share, f"could not observe the fleet: {exc!r}", "error")
        action, name, reason, key = _decide(p, replicas, share, idle, can_add)
        if action == "add":
            try:
                name = self._fleet.add()
            except Exception as exc:  # e.g. Ray could not place the actor
                return self._hold(replicas, share, f"{reason}; adding failed: {exc!r}", "add_err")
            replicas += 1
        elif action == "remove":
            assert name is not None
            try:
                self._fleet.remove(name)
            except Exception as exc:
                return self._hold(
                    replicas, share, f"{reason}; removing {name} failed: {exc!r}", "rm_err"
                )
            replicas -= 1
        t = self._clock() - self._t0
        return self._record(ScaleDecision(t, action, replicas, share, reason, name), key)

    def start(self) -> None:
        """Record the initial size, then decide every ``interval_s`` in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("autoscaler already started")
        self._t0 = self._clock()
        p = self.policy
        try:
            size = self._fleet.size()
        except Exception as exc:
            size = 0
            self._log.warning("autoscale: could not read the fleet size: %r", exc)
        reason = (
            f"autoscaling {p.min}..{p.max} replicas at target wait {p.target_wait:.1%}, "
            f"every {p.interval_s:g}s"
        )
        self._record(ScaleDecision(0.0, "start", size, None, reason), "start")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stkd-autoscale", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Event.wait is the interval: stop() wakes it at once instead of after a sleep
        while not self._stop.wait(self.policy.interval_s):
            self.tick()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the thread and wait for it (a decision in progress completes first)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def __enter__(self) -> Autoscaler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
