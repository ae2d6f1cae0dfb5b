"""Replicas in separate ``stkd serve`` processes: SIGKILL mid-stream, SIGTERM drain, failover."""

from __future__ import annotations

import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stkd_dist.serving.client import Backoff, LabelItem, SoftLabelClient
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.teacher import Teacher
from stkd_dist.testing import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = Backoff(initial_s=0.02, max_s=0.2, max_attempts=8)


def sequence(direct: Teacher, repeats: int = 30) -> np.ndarray:
    """The train windows ``repeats`` times over: megabytes, far more than socket buffers."""
    return np.tile(np.asarray(direct.meta.splits["train"]), repeats)


def check_delivery(direct: Teacher, wanted: np.ndarray, items: list[LabelItem]) -> None:
    idx = np.concatenate([i for i, _ in items])
    pred = np.concatenate([lab.prediction for _, lab in items])
    # exactly once, in order: the same sequence, the same length
    assert len(idx) == len(wanted)
    np.testing.assert_array_equal(idx, wanted)
    unique = np.unique(wanted)
    ref = direct.predict(unique).prediction
    np.testing.assert_allclose(pred, ref[np.searchsorted(unique, idx)], rtol=1e-5, atol=1e-5)


def test_sigkill_mid_stream_fails_over_exactly_once(spawn_servers, teacher_env, direct) -> None:
    a, b = spawn_servers("--batch-size", "32", count=2)
    by_address = {a.address: a, b.address: b}
    wanted = sequence(direct)
    client = SoftLabelClient(
        [a.address, b.address],
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=16384,
        prefetch=2,
        backoff=FAST,
    )
    with client:
        stream = client.stream("train", wanted)
        items = [next(stream)]
        (first,) = client.stats.endpoints
        victim = by_address[first]
        victim.signal(signal.SIGKILL)
        assert victim.proc.wait(10) == -signal.SIGKILL
        items.extend(stream)
    check_delivery(direct, wanted, items)
    assert client.stats.reconnects >= 1
    assert client.stats.endpoints == {a.address, b.address}
    assert client.stats.windows == len(wanted)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service="stkd.v1.TeacherService"), timeout=5)
            .status
        )


def test_sigterm_drains_and_the_client_resumes_elsewhere(
    spawn_servers, teacher_env, direct
) -> None:
    a, b = spawn_servers("--drain-grace", "0.5", count=2)
    by_address = {a.address: a, b.address: b}
    wanted = sequence(direct)
    client = SoftLabelClient(
        [a.address, b.address],
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=16384,
        prefetch=2,
        backoff=FAST,
    )
    with client:
        stream = client.stream("train", wanted)
        items = [next(stream)]
        (first,) = client.stats.endpoints
        victim = by_address[first]
        victim.signal(signal.SIGTERM)
        # health turns NOT_SERVING first, and new streams are refused while draining
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: _health(victim.address) == not_serving, 10, "health NOT_SERVING")
        with grpc.insecure_channel(victim.address) as ch:
            req = pb.LabelRequest(
                dataset_fingerprint=teacher_env.fingerprint,
                split="train",
                ranges=pb.WindowRanges(ranges=[pb.WindowRange(start=0, stop=5, step=1)]),
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.TeacherServiceStub(ch).StreamLabels(req, timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # a slow consumer: the in-flight stream outlives the grace period
        for item in stream:
            items.append(item)
            if len(items) < 200:
                time.sleep(0.005)
    check_delivery(direct, wanted, items)
    assert client.stats.reconnects >= 1
    assert client.stats.endpoints == {a.address, b.address}
    # the drained server exits cleanly, having ended the stream with UNAVAILABLE
    assert victim.proc.wait(15) == 0
    log = victim.output()
    assert "event=drain" in log
    assert "event=stream_end" in log and "status=UNAVAILABLE" in log
    with pytest.raises(grpc.RpcError) as gone:
        _health(victim.address)
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
