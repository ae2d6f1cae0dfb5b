"""Autoscaling of the teacher replicas: the decision table, the autoscaler over a fake fleet, the
students' wait reporting (fake clock, fake actor) and one real Ray actor meter."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from stkd_dist.config.pipeline import AutoscaleSection
from stkd_dist.labels.autoscale import (
    Autoscaler,
    FleetOps,
    ScaleDecision,
    WaitMeter,
    WaitReporter,
    decide,
)

POLICY = AutoscaleSection(min=1, max=3, target_wait=0.2, interval_s=5.0, idle_s=10.0)


# --- the decision table ------------------------------------------------------------------------


def _decide(
    replicas: int = 2,
    wait_share: float | None = 0.1,
    idle: tuple[str, ...] = (),
    can_add: bool = True,
    policy: AutoscaleSection = POLICY,
) -> tuple[str, str | None, str]:
    return decide(policy, replicas=replicas, wait_share=wait_share, idle=idle, can_add=can_add)


def test_high_wait_adds_below_max() -> None:
    action, name, reason = _decide(replicas=1, wait_share=0.5)
    assert (action, name) == ("add", None)
    assert "50.0%" in reason and "20.0%" in reason


def test_high_wait_holds_at_max() -> None:
    action, name, reason = _decide(replicas=3, wait_share=0.9, can_add=True)
    assert (action, name) == ("hold", None)
    assert "at serve.autoscale.max (3)" in reason


def test_high_wait_holds_without_room() -> None:
    action, _, reason = _decide(replicas=2, wait_share=0.5, can_add=False)
    assert action == "hold"
    assert "cluster has no room for another replica (CPUs/GPUs)" in reason


def test_wait_at_target_holds() -> None:
    # exactly the target is not above it
    assert _decide(replicas=2, wait_share=0.2, idle=("r1",))[0] == "hold"


def test_hysteresis_band_holds_even_with_idle_replicas() -> None:
    action, _, reason = _decide(replicas=2, wait_share=0.15, idle=("r1",))
    assert action == "hold"
    assert "10.0%" in reason and "20.0%" in reason


def test_low_wait_removes_first_idle() -> None:
    action, name, reason = _decide(replicas=3, wait_share=0.1, idle=("r2", "r1"))
    assert (action, name) == ("remove", "r2")
    assert "r2" in reason and "10s" in reason


def test_low_wait_without_idle_holds() -> None:
    action, _, reason = _decide(replicas=3, wait_share=0.0, idle=())
    assert action == "hold"
    assert "no replica idle" in reason


def test_low_wait_at_min_holds() -> None:
    action, _, reason = _decide(replicas=1, wait_share=0.0, idle=("r0",))
    assert action == "hold"
    assert "serve.autoscale.min" in reason


def test_no_steps_removes_idle_above_min() -> None:
    assert _decide(replicas=2, wait_share=None, idle=("r1",)) == (
        "remove",
        "r1",
        "no student step measured; r1 served no stream for 10s",
    )


def test_no_steps_holds_at_min_or_without_idle() -> None:
    assert _decide(replicas=1, wait_share=None, idle=("r0",))[0] == "hold"
    assert _decide(replicas=2, wait_share=None, idle=())[0] == "hold"


def test_below_min_adds_back_whatever_the_share() -> None:
    policy = AutoscaleSection(min=2, max=3)
    assert _decide(replicas=1, wait_share=None, policy=policy)[0] == "add"
    assert _decide(replicas=1, wait_share=None, can_add=False, policy=policy)[0] == "hold"


# --- the autoscaler over a fake fleet (driven by tick(), no thread) ---------------------------


class FakeFleet:
    """Replicas ``r0, r1, ...``; ``busy`` ones are never idle; ``fail_add`` makes add raise."""

    def __init__(self, size: int = 1) -> None:
        self.names = [f"r{i}" for i in range(size)]
        self.created = size
        self.busy: set[str] = set()
        self.room = True
        self.fail_add: Exception | None = None
        self.removed: list[str] = []

    def size(self) -> int:
        return len(self.names)

    def add(self) -> str:
        if self.fail_add is not None:
            raise self.fail_add
        name = f"r{self.created}"
        self.created += 1
        self.names.append(name)
        return name

    def remove(self, name: str) -> None:
        self.names.remove(name)
        self.removed.append(name)

    def idle(self, idle_s: float) -> list[str]:
        # newest first: the last added is the first to go
        return [n for n in reversed(self.names) if n not in self.busy]

    def can_add(self) -> bool:
        return self.room


class FakeMeter:
    """take_wait returning a fixed share (None = no reports)."""

    def __init__(self) -> None:
        self.share: float | None = 0.5

    def __call__(self) -> tuple[float, float, int]:
        if self.share is None:
            return 0.0, 0.0, 0
        return self.share * 10.0, 10.0, 4


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _autoscaler(fleet: FakeFleet, meter: FakeMeter, clock: FakeClock | None = None) -> Autoscaler:
    fleet_ops: FleetOps = fleet  # the fake satisfies the protocol
    return Autoscaler(POLICY, fleet_ops, meter, clock=clock or FakeClock())


def test_scales_up_to_max_then_holds() -> None:
    fleet, meter = FakeFleet(1), FakeMeter()
    fleet.busy = {"r0", "r1", "r2"}
    scaler = _autoscaler(fleet, meter)
    decisions = [scaler.tick() for _ in range(4)]
    assert [d.action for d in decisions] == ["add", "add", "hold", "hold"]
    assert [d.replicas for d in decisions] == [2, 3, 3, 3]
    assert [d.replica for d in decisions[:2]] == ["r1", "r2"]
    assert fleet.size() == 3
    assert decisions[0].wait_share == pytest.approx(0.5)
    assert "serve.autoscale.max" in decisions[-1].reason
    assert scaler.timeline == tuple(decisions)


def test_shrinks_to_min_when_idle_without_waits() -> None:
    fleet, meter = FakeFleet(3), FakeMeter()
    meter.share = None
    scaler = _autoscaler(fleet, meter)
    decisions = [scaler.tick() for _ in range(3)]
    assert [(d.action, d.replica, d.replicas) for d in decisions] == [
        ("remove", "r2", 2),
        ("remove", "r1", 1),
        ("hold", None, 1),
    ]
    assert fleet.names == ["r0"]
    assert decisions[-1].wait_share is None


def test_busy_replicas_are_kept_when_wait_is_low() -> None:
    fleet, meter = FakeFleet(3), FakeMeter()
    meter.share = 0.01
    fleet.busy = {"r0", "r2"}
    scaler = _autoscaler(fleet, meter)
    assert (scaler.tick().action, fleet.removed) == ("remove", ["r1"])
    assert scaler.tick().action == "hold"
    assert fleet.names == ["r0", "r2"]


def test_add_failure_is_recorded_as_hold() -> None:
    fleet, meter = FakeFleet(1), FakeMeter()
    fleet.fail_add = RuntimeError("no node fits {'GPU': 1}")
    scaler = _autoscaler(fleet, meter)
    decision = scaler.tick()
    assert (decision.action, decision.replicas, decision.replica) == ("hold", 1, None)
    assert "adding failed" in decision.reason and "no node fits" in decision.reason
    fleet.fail_add = None
    assert scaler.tick().action == "add"


def test_no_room_holds_and_take_wait_error_holds() -> None:
    fleet, meter = FakeFleet(1), FakeMeter()
    fleet.room = False
    scaler = _autoscaler(fleet, meter)
    assert "no room" in scaler.tick().reason

    def broken() -> tuple[float, float, int]:
        raise ConnectionError("meter gone")

    scaler = Autoscaler(POLICY, fleet, broken, clock=FakeClock())
    decision = scaler.tick()
    assert decision.action == "hold" and "meter gone" in decision.reason
    assert fleet.size() == 1


def test_timeline_times_and_json() -> None:
    fleet, meter, clock = FakeFleet(1), FakeMeter(), FakeClock()
    scaler = _autoscaler(fleet, meter, clock)
    clock.t += 5.0
    decision = scaler.tick()
    assert decision.t_s == pytest.approx(5.0)
    assert decision.to_json() == {
        "t_s": 5.0,
        "action": "add",
        "replicas": 2,
        "wait_share": 0.5,
        "reason": decision.reason,
        "replica": "r1",
    }
    assert ScaleDecision(0.0, "start", 1, None, "x").to_json()["wait_share"] is None


def test_repeated_identical_holds_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fleet, meter = FakeFleet(3), FakeMeter()
    fleet.busy = {"r0", "r1", "r2"}
    scaler = _autoscaler(fleet, meter)
    with caplog.at_level(logging.INFO, logger="stkd_dist.labels.autoscale"):
        for _ in range(3):
            scaler.tick()
        meter.share = 0.6  # another share, same kind of hold: still not logged again
        scaler.tick()
    lines = [r.getMessage() for r in caplog.records if "event=autoscale" in r.getMessage()]
    assert len(lines) == 1
    assert "action=hold" in lines[0] and "replicas=3" in lines[0] and "wait_share=0.500" in lines[0]
    assert len(scaler.timeline) == 4


def test_start_stop_runs_in_a_thread() -> None:
    fleet, meter = FakeFleet(1), FakeMeter()
    fleet.busy = {"r0", "r1", "r2"}
    policy = AutoscaleSection(min=1, max=3, target_wait=0.2, interval_s=0.01, idle_s=0.0)
    ticked = threading.Event()

    def take() -> tuple[float, float, int]:
        out = meter()
        ticked.set()
        return out

    with Autoscaler(policy, fleet, take) as scaler:
        # wait on the thread's progress, not a fixed time
        assert ticked.wait(10.0)
        for _ in range(1000):
            if len(scaler.timeline) >= 3:
                break
            ticked.clear()
            assert ticked.wait(10.0)
        with pytest.raises(RuntimeError, match="already started"):
            scaler.start()
    timeline = scaler.timeline
    assert timeline[0].action == "start" and timeline[0].replicas == 1
    assert timeline[0].t_s == 0.0
    assert [d.action for d in timeline[1:3]] == ["add", "add"]
    assert len(scaler.timeline) == len(timeline)  # stopped: nothing more is appended


# --- the meter and the students' reporters -----------------------------------------------------


def test_meter_sums_and_resets() -> None:
    meter = WaitMeter()
    assert meter.take() == (0.0, 0.0, 0)
    meter.record(0, 1.0, 4.0)
    meter.record(1, 0.5, 2.0)
    meter.record(1, float("nan"), 1.0)  # dropped
    meter.record(1, -1.0, 1.0)  # dropped
    assert meter.take() == (1.5, 6.0, 2)
    assert meter.take() == (0.0, 0.0, 0)


class FakeActor:
    """Stands for a Ray actor handle: ``actor.record.remote(...)``."""

    def __init__(self, meter: WaitMeter) -> None:
        self.calls = 0
        outer = self

        class _Method:
            def remote(self, rank: int, wait_s: float, step_s: float) -> None:
                outer.calls += 1
                meter.record(rank, wait_s, step_s)

        self.record = _Method()


def test_reporter_throttles_sends() -> None:
    meter, clock = WaitMeter(), FakeClock()
    actor = FakeActor(meter)
    lookups: list[tuple[str, str | None]] = []

    def lookup(name: str, namespace: str | None) -> Any:
        lookups.append((name, namespace))
        return actor

    reporter = WaitReporter("meter", "ns", every_s=1.0, clock=clock, rank=3, lookup=lookup)
    for _ in range(3):  # 0.75 s of steps (exact in binary): below every_s, nothing sent
        clock.t += 0.25
        reporter.step(0.05, 0.25)
    assert actor.calls == 0 and lookups == []
    clock.t += 0.25
    reporter.step(0.05, 0.25)
    assert actor.calls == 1 and lookups == [("meter", "ns")]
    assert meter.take() == (pytest.approx(0.2), 1.0, 1)
    reporter.step(0.05, 0.1)
    reporter.flush()
    assert actor.calls == 2 and len(lookups) == 1  # the handle is looked up once
    assert meter.take()[2] == 1
    reporter.flush()  # nothing accumulated: nothing sent
    assert actor.calls == 2


def test_reporter_is_a_no_op_without_a_meter() -> None:
    def lookup(name: str, namespace: str | None) -> Any:
        raise AssertionError("never looked up")

    reporter = WaitReporter(None, lookup=lookup, every_s=0.0)
    reporter.step(1.0, 2.0)
    reporter.flush()
    assert not reporter.active


def test_reporter_survives_a_gone_meter(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def lookup(name: str, namespace: str | None) -> Any:
        calls.append(name)
        raise ValueError(f"Failed to look up actor with name '{name}'")

    reporter = WaitReporter("gone", every_s=0.0, lookup=lookup)
    with caplog.at_level(logging.DEBUG, logger="stkd_dist.labels.autoscale"):
        for _ in range(5):
            reporter.step(0.1, 1.0)
        reporter.flush()
    assert calls == ["gone"] and not reporter.active
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


def test_reporter_survives_a_failing_call() -> None:
    class Dead:
        class record:  # mimics the actor method attribute
            @staticmethod
            def remote(*args: object) -> None:
                raise RuntimeError("actor died")

    reporter = WaitReporter("m", every_s=0.0, lookup=lambda name, ns: Dead())
    reporter.step(0.1, 1.0)
    reporter.step(0.1, 1.0)
    assert not reporter.active


# --- the meter as a real Ray actor ------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_meter_as_a_named_ray_actor(ray_local: Any) -> None:
    ray = ray_local
    meter = ray.remote(WaitMeter).options(name="stkd-test-wait-meter", num_cpus=0).remote()
    reporters = [WaitReporter("stkd-test-wait-meter", every_s=0.0, rank=r) for r in range(2)]
    for rank, reporter in enumerate(reporters):
        reporter.step(0.25 * (rank + 1), 1.0)
    assert all(r.active for r in reporters)
    # actor calls from one caller run in order: the take comes after both records
    wait_s, step_s, reports = ray.get(meter.take.remote(), timeout=60)
    assert (wait_s, step_s, reports) == (pytest.approx(0.75), pytest.approx(2.0), 2)
    ray.kill(meter)
    gone = WaitReporter("stkd-test-wait-meter", every_s=0.0)
    for _ in range(3):
        gone.step(0.1, 1.0)  # never raises once the meter is gone
