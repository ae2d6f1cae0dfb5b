"""The teacher server on 127.0.0.1: status codes, concurrency, limits, health, drain, metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stkd_dist.serving.client import (
    LabelMismatchError,
    PlanRequest,
    SoftLabelClient,
    TeacherRequestError,
)
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.server import SERVICE_NAME, TeacherServer
from stkd_dist.serving.teacher import Teacher

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def stub(server: TeacherServer) -> tuple[grpc.Channel, pb_grpc.TeacherServiceStub]:
    ch = grpc.insecure_channel(server.address)
    return ch, pb_grpc.TeacherServiceStub(ch)


def ranges(*rs: tuple[int, int, int]) -> pb.WindowRanges:
    return pb.WindowRanges(ranges=[pb.WindowRange(start=a, stop=b, step=s) for a, b, s in rs])


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        list(call)  # type: ignore[call-overload]
    return info.value.code()


def test_describe_reports_the_teacher(
    server_factory: Callable[..., TeacherServer], teacher_env, direct: Teacher
) -> None:
    server = server_factory()
    ch, s = stub(server)
    info = s.Describe(pb.DescribeRequest(), timeout=10)
    ch.close()
    assert info.teacher_version == teacher_env.version
    assert info.dataset_fingerprint == teacher_env.fingerprint
    assert info.model_key == "lstm" and info.has_spread
    assert list(info.window_shape) == [12, 5, 2] and info.horizon == 12
    counts = {sp.split: sp.windows for sp in info.splits}
    assert counts == {k: len(v) for k, v in direct.meta.splits.items()}


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"dataset_fingerprint": "0" * 16}, Code.FAILED_PRECONDITION, "dataset"),
        ({"teacher_version": "other-e1-deadbeef"}, Code.FAILED_PRECONDITION, "teacher"),
        ({"ranges": ranges((0, 10**6, 1))}, Code.OUT_OF_RANGE, "not a window of split"),
        ({"ranges": ranges((420, 425, 1))}, Code.OUT_OF_RANGE, "train"),  # val windows
        ({"resume_cursor": 11}, Code.OUT_OF_RANGE, "cursor"),
        ({"ranges": ranges((10, 5, 1))}, Code.INVALID_ARGUMENT, "malformed"),
        ({"ranges": ranges((0, 5, -1))}, Code.INVALID_ARGUMENT, "malformed"),
        ({"ranges": pb.WindowRanges()}, Code.INVALID_ARGUMENT, "no ranges"),
        ({"split": "holdout"}, Code.INVALID_ARGUMENT, "unknown split"),
        ({"plan": pb.ShardPlanSpec(world_size=2, rank=2)}, Code.INVALID_ARGUMENT, "rank"),
        ({"max_message_bytes": 100}, Code.INVALID_ARGUMENT, "max_message_bytes"),
        ({"wire_dtype": 9}, Code.INVALID_ARGUMENT, "wire dtype"),
    ],
)
def test_bad_requests_get_their_status_code(
    server_factory: Callable[..., TeacherServer], teacher_env, change: dict, code, words: str
) -> None:
    server = server_factory()
    req = pb.LabelRequest(
        dataset_fingerprint=teacher_env.fingerprint, split="train", ranges=ranges((0, 10, 1))
    )
    for key, value in change.items():
        if isinstance(value, pb.WindowRanges | pb.ShardPlanSpec):
            getattr(req, key).CopyFrom(value)
        else:
            setattr(req, key, value)
    ch, s = stub(server)
    with pytest.raises(grpc.RpcError) as info:
        list(s.StreamLabels(req, timeout=10))
    ch.close()
    assert info.value.code() == code
    assert words in info.value.details()
    assert server.metrics.value("stkd_serve_stream_errors_total", code=code.name) == 1
    assert server.active_streams == 0


def test_client_maps_refusals_to_errors(server_factory, teacher_env) -> None:
    server = server_factory()
    with (
        SoftLabelClient([server.address], expected_fingerprint="f" * 16) as c,
        pytest.raises(LabelMismatchError, match="dataset"),
    ):
        list(c.stream("train", range(5)))
    with SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, expected_version="nope"
    ) as c:
        with pytest.raises(LabelMismatchError, match="teacher"):
            list(c.stream("train", range(5)))
        with pytest.raises(LabelMismatchError, match="version"):
            c.describe()
    with (
        SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c,
        pytest.raises(TeacherRequestError, match="OUT_OF_RANGE"),
    ):
        list(c.stream("val", range(5)))


def _stream_all(server: TeacherServer, env, windows: list[int], out: dict, key: int) -> None:
    with SoftLabelClient(
        [server.address], expected_fingerprint=env.fingerprint, max_message_bytes=4096
    ) as c:
        items = list(c.stream("train", windows))
    out[key] = (
        np.concatenate([i for i, _ in items]),
        np.concatenate([lab.prediction for _, lab in items]),
        len(items),
    )


def test_16_concurrent_streams_share_the_batcher(server_factory, teacher_env, direct) -> None:
    server = server_factory(batch_size=64, max_streams=16, batch_wait_s=0.02)
    rng = np.random.default_rng(0)
    requests = {k: rng.permutation(397)[:48].tolist() for k in range(16)}
    out: dict = {}
    threads = [
        threading.Thread(target=_stream_all, args=(server, teacher_env, requests[k], out, k))
        for k in requests
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == list(range(16))
    for k, windows in requests.items():
        idx, pred, n_chunks = out[k]
        assert idx.tolist() == windows  # every window once, in the requested order
        assert n_chunks > 1
        ref = direct.predict(idx).prediction
        np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)
    per_chunk = (4096 - 1024) // (12 * 5 * 2 * 4 + 10)  # windows in one request's chunk
    stats = server.batcher_stats()
    assert stats.max_batch > per_chunk
    assert stats.max_requests_per_batch > 1
    assert server.teacher.forward_windows == stats.windows <= 16 * 48


def _held_stream(server: TeacherServer, env) -> tuple[grpc.Channel, object]:
    """A stream far larger than the flow-control window, read one chunk and then left alone."""
    ch, s = stub(server)
    req = pb.LabelRequest(
        dataset_fingerprint=env.fingerprint,
        split="train",
        ranges=ranges(*[(0, 397, 1)] * 200),  # ~79k windows, ~38 MB
        max_message_bytes=65536,
    )
    call = s.StreamLabels(req, timeout=30)
    next(call)
    return ch, call


def test_streams_past_the_limit_get_resource_exhausted(server_factory, teacher_env) -> None:
    server = server_factory(max_streams=1)
    ch, held = _held_stream(server, teacher_env)
    assert server.active_streams == 1
    ch2, s = stub(server)
    req = pb.LabelRequest(
        dataset_fingerprint=teacher_env.fingerprint, split="train", ranges=ranges((0, 5, 1))
    )
    assert status_of(s.StreamLabels(req, timeout=10)) == Code.RESOURCE_EXHAUSTED
    held.cancel()
    ch.close()
    deadline = time.monotonic() + 5
    while server.active_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(list(s.StreamLabels(req, timeout=10))) == 1  # a slot is free again
    ch2.close()


def health_status(address: str, service: str = SERVICE_NAME) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_serving_then_not_serving_on_drain(server_factory, teacher_env) -> None:
    server = server_factory(drain_grace_s=0.5)
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.address, "") == health_pb2.HealthCheckResponse.SERVING
    ch, held = _held_stream(server, teacher_env)
    drainer = threading.Thread(target=server.drain)
    drainer.start()
    # health flips before anything else: probes see NOT_SERVING while the stream still runs
    deadline = time.monotonic() + 5
    while health_status(server.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.active_streams == 1
    # new streams are refused while draining
    ch2, s = stub(server)
    req = pb.LabelRequest(
        dataset_fingerprint=teacher_env.fingerprint, split="train", ranges=ranges((0, 5, 1))
    )
    assert status_of(s.StreamLabels(req, timeout=10)) == Code.UNAVAILABLE
    ch2.close()
    # the held stream is ended after the grace period with UNAVAILABLE and a resume cursor
    with pytest.raises(grpc.RpcError) as info:
        for _ in held:  # type: ignore[attr-defined]
            pass
    assert info.value.code() == Code.UNAVAILABLE
    assert "resume at cursor" in info.value.details()
    drainer.join(10)
    assert not drainer.is_alive() and server.wait(0)
    ch.close()
    with pytest.raises(grpc.RpcError) as closed:
        health_status(server.address)
    assert closed.value.code() == Code.UNAVAILABLE


def test_plan_requests_stream_the_ranks_windows(server_factory, teacher_env, direct) -> None:
    from stkd_dist.data.plan import make_plan

    server = server_factory()
    windows = direct.meta.splits["train"]
    chunk_steps = direct.reader.store.chunks[0]
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        seen = []
        for rank in range(3):
            spec = PlanRequest(world_size=3, rank=rank, epoch=2, seed=5, batch_size=16)
            got = np.concatenate([i for i, _ in c.stream_plan("train", spec)])
            plan = make_plan(windows, chunk_steps, 3, epoch=2, seed=5, batch_size=16)
            assert got.tolist() == plan.rank_windows(rank)
            seen.extend(got.tolist())
    assert sorted(seen) == list(windows)  # the ranks' streams partition the split


def test_a_re_dealt_plan_streams_the_rest_of_the_epoch(server_factory, teacher_env, direct) -> None:
    from stkd_dist.data.plan import make_plan

    server = server_factory()
    windows = direct.meta.splits["train"]
    chunk_steps = direct.reader.store.chunks[0]
    first = make_plan(windows, chunk_steps, 3, epoch=1, seed=5, batch_size=16)
    done = [w for r in range(3) for w in first.rank_windows(r)[: 2 * 16]]  # 2 steps on 3 ranks
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        rest = []
        for rank in range(2):  # then the rest on 2 (elastic training lost a worker)
            spec = PlanRequest(
                world_size=2, rank=rank, epoch=1, seed=5, batch_size=16, regroups=((3, 2),)
            )
            rest.append(np.concatenate([i for i, _ in c.stream_plan("train", spec)]))
        bad = PlanRequest(world_size=2, rank=0, epoch=1, seed=5, batch_size=16, regroups=((3, 99),))
        with pytest.raises(TeacherRequestError, match="INVALID_ARGUMENT: steps: a plan of") as e:
            list(c.stream_plan("train", bad))
    # the server streamed the windows the 3 ranks had not reached, cut in two runs in order
    tails = np.concatenate([first.rank(r).window_array(2 * 16) for r in range(3)])
    assert [r.tolist() for r in rest] == [p.tolist() for p in np.array_split(tails, 2)]
    assert sorted(done + np.concatenate(rest).tolist()) == list(windows)
    assert f"re-dealt after step 1..{first.num_batches - 1}, not 99" in str(e.value)


def test_metrics_endpoint_counts_windows_and_bytes(server_factory, teacher_env) -> None:
    server = server_factory(metrics_port=0)
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        items = list(c.stream("test", range(480, 530), spread=True))
    assert sum(len(i) for i, _ in items) == 50
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    text = text.decode()
    assert 'stkd_serve_windows_total{source="teacher"} 50.0' in text
    assert f"stkd_serve_bytes_total {50 * 12 * 5 * 2 * 4 * 2}.0" in text
    assert "stkd_serve_batch_windows_bucket" in text
    assert "stkd_serve_forward_windows_total 50.0" in text
    assert "stkd_serve_active_streams 0.0" in text
    assert "stkd_serve_cache_misses_total 50.0" in text
