"""Stream placement and admission: least-loaded replicas, full replicas redirect or queue,
periodic discovery, and the error when every replica is gone."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from stkd_dist.errors import ConfigError
from stkd_dist.serving.client import (
    Backoff,
    ClientOptions,
    SoftLabelClient,
    TeacherUnavailableError,
)
from stkd_dist.serving.discovery import Endpoint, EndpointSource
from stkd_dist.serving.load import StreamLoad
from stkd_dist.serving.placement import AllFull, Placement, ReplicaLoad
from stkd_dist.serving.server import TeacherServer

FAST = Backoff(initial_s=0.01, max_s=0.05, max_attempts=3)
A, B, C = (Endpoint(f"127.0.0.1:{p}") for p in (1001, 1002, 1003))
# more labels than gRPC's flow-control windows hold: an unread stream stays active on its server
BUSY = np.tile(np.arange(397), 200)


class Source(EndpointSource):
    """An endpoint source whose replicas the test sets (counts its resolutions)."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        super().__init__("127.0.0.1:1")
        self.current = endpoints
        self.resolved = 0

    def resolve(self) -> list[Endpoint]:
        self.resolved += 1
        return list(self.current)


def _placement(loads: dict[Endpoint, ReplicaLoad | None], source: Source, **kw: object):
    return Placement(source, lambda ep: loads.get(ep), **kw)  # type: ignore[arg-type]


# -- placement logic ------------------------------------------------------------------------------
def test_the_replica_with_fewest_outstanding_windows_gets_the_stream() -> None:
    loads = {A: ReplicaLoad(3, 16, 900), B: ReplicaLoad(5, 16, 100), C: ReplicaLoad(1, 16, 400)}
    placement = _placement(loads, Source([A, B, C]))
    assert {placement.pick() for _ in range(10)} == {B}  # streams, not windows, differ: B
    loads[B] = ReplicaLoad(16, 16, 0)  # full: not a candidate however idle it looks
    assert placement.pick() == C
    assert placement.pick(exclude=[C]) == A  # the replica just failed on is avoided


def test_ties_go_round_robin_and_a_silent_replica_is_the_last_resort() -> None:
    loads: dict[Endpoint, ReplicaLoad | None] = {A: ReplicaLoad(0, 4, 0), B: ReplicaLoad(0, 4, 0)}
    placement = _placement(loads, Source([A, B]))
    assert {placement.pick() for _ in range(4)} == {A, B}
    clock = [0.0]
    loads[A] = None  # stopped: does not answer its probe
    placement = _placement(loads, Source([A, B]), clock=lambda: clock[0], discovery_s=5.0)
    assert {placement.pick() for _ in range(4)} == {B}
    loads = {A: None, B: None}  # nobody answers: round robin, the stream attempt will tell
    placement = _placement(loads, Source([A, B]))
    assert {placement.pick() for _ in range(4)} == {A, B}


def test_every_replica_full_is_all_full_and_none_known_is_a_lookup_error() -> None:
    loads = {A: ReplicaLoad(2, 2, 10), B: ReplicaLoad(1, 1, 10)}
    with pytest.raises(AllFull) as info:
        _placement(loads, Source([A, B])).pick()
    assert set(info.value.endpoints) == {A, B}
    with pytest.raises(LookupError):
        _placement({}, Source([])).pick()


def test_the_source_is_resolved_again_after_discovery_s_and_kept_when_it_fails() -> None:
    clock = [0.0]
    source = Source([A])
    loads = {A: ReplicaLoad(1, 16, 500), B: ReplicaLoad(0, 16, 0)}
    placement = _placement(loads, source, discovery_s=5.0, clock=lambda: clock[0])
    assert placement.pick() == A
    source.current = [A, B]  # a replica was started
    clock[0] = 4.0
    assert placement.pick() == A and source.resolved == 1  # not due yet
    clock[0] = 5.5
    assert placement.pick() == B and source.resolved == 2  # found without any failure

    def broken() -> list[Endpoint]:
        raise ConfigError("cannot resolve", where="dns:///x")

    source.resolve = broken  # type: ignore[method-assign]
    clock[0] = 20.0
    assert placement.pick() == B  # the last known replicas serve on


def test_stream_load_counts_outstanding_windows_and_idle_time() -> None:
    now = [0.0]
    load = StreamLoad(2, clock=lambda: now[0])
    assert load.acquire() and load.acquire() and not load.acquire()
    load.progress(100)
    load.progress(50)
    load.progress(-30)
    snap = load.snapshot()
    assert (snap.active_streams, snap.outstanding_windows, snap.idle_s) == (2, 120, 0.0)
    load.release(unsent=70)  # a stream broke with 70 windows unsent
    now[0] = 3.0
    load.release(unsent=50)
    now[0] = 10.0
    snap = load.snapshot()
    assert (snap.active_streams, snap.outstanding_windows, snap.streams_served) == (0, 0, 2)
    assert snap.idle_s == pytest.approx(7.0)


# -- real servers ---------------------------------------------------------------------------------
def _client(servers: list[TeacherServer], env: object, **kw: object) -> SoftLabelClient:
    return SoftLabelClient(
        [s.address for s in servers],
        expected_fingerprint=env.fingerprint,  # type: ignore[attr-defined]
        options=ClientOptions(backoff=FAST, prefetch=1, max_message_bytes=16384, **kw),  # type: ignore[arg-type]
    )


def test_a_full_replica_is_avoided_and_its_refusal_redirects(
    server_factory: Callable[..., TeacherServer], teacher_env: object, direct: object
) -> None:
    a, b = server_factory(max_streams=1), server_factory(max_streams=1)
    with _client([a, b], teacher_env) as client:
        busy = client.stream("train", BUSY)
        next(busy)
        (held,) = client.stats.endpoints
        # placement asks both: the one holding the busy stream is full, the other gets it
        got = list(client.stream("train", np.arange(50)))
        assert sum(len(i) for i, _ in got) == 50
        assert client.stats.redirects == 0 and client.stats.reconnects == 0
        assert len(client.stats.endpoints) == 2
        # a client that cannot see loads (stale probe) lands on the full one and is redirected
        client.placement.probe = lambda ep: ReplicaLoad(0, 0, 0)  # type: ignore[method-assign]
        full = next(s for s in (a, b) if s.address == held)
        for _ in range(4):
            assert sum(len(i) for i, _ in client.stream("train", np.arange(20))) == 20
        busy.close()
    refused = full.metrics.value("stkd_serve_stream_errors_total", code="RESOURCE_EXHAUSTED")
    assert client.stats.redirects == refused >= 1  # every refusal was placed elsewhere
    assert client.stats.reconnects == 0  # and none counted as a failure
    pred = np.concatenate([lab.prediction for _, lab in got])
    np.testing.assert_array_equal(pred, direct.predict(np.arange(50)).prediction)  # type: ignore[attr-defined]


def test_with_every_replica_full_a_stream_waits_for_a_slot(
    server_factory: Callable[..., TeacherServer], teacher_env: object
) -> None:
    (a,) = [server_factory(max_streams=1)]
    with _client([a], teacher_env) as client:
        busy = client.stream("train", BUSY)
        next(busy)
        result: list[int] = []
        waiting = threading.Thread(
            target=lambda: result.append(
                sum(len(i) for i, _ in client.stream("train", np.arange(30)))
            )
        )
        waiting.start()
        # observable: the second stream found the only replica full and waits
        deadline = threading.Event()
        for _ in range(500):
            if client.stats.admission_waits:
                break
            deadline.wait(0.01)
        assert client.stats.admission_waits >= 1 and not result
        busy.close()  # its slot frees
        waiting.join(30)
    assert result == [30]


def test_a_queue_that_never_frees_ends_in_one_clear_error(
    server_factory: Callable[..., TeacherServer], teacher_env: object
) -> None:
    (a,) = [server_factory(max_streams=1)]
    with _client([a], teacher_env, admission_timeout_s=0.3) as client:
        busy = client.stream("train", BUSY)
        next(busy)
        with pytest.raises(TeacherUnavailableError, match="max_streams") as info:
            list(client.stream("train", np.arange(30)))
        assert "serve.max_streams" in str(info.value) and a.address in str(info.value)
        busy.close()


def test_all_replicas_gone_names_the_teacher_and_every_endpoint_tried(
    server_factory: Callable[..., TeacherServer], teacher_env: object
) -> None:
    a, b = server_factory(), server_factory()
    with _client([a, b], teacher_env) as client:
        stream = client.stream("train", BUSY)
        next(stream)
        a.stop()
        b.stop()
        with pytest.raises(TeacherUnavailableError) as info:
            list(stream)
    text = str(info.value)
    assert teacher_env.version in text  # type: ignore[attr-defined]
    assert a.address in text and b.address in text and "endpoints tried" in text
    assert "resumes from the last checkpoint" in text
