"""The client: joining labels with batches, checksum retries, deadlines, prefetch, discovery."""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any

import numpy as np
import pytest

from stkd_dist.data.plan import make_plan
from stkd_dist.errors import ConfigError
from stkd_dist.serving import codec
from stkd_dist.serving.client import (
    Backoff,
    LabelMismatchError,
    PlanRequest,
    SoftLabelClient,
    TeacherUnavailableError,
)
from stkd_dist.serving.discovery import EndpointSource, resolve_dns
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import Teacher

pytestmark = pytest.mark.integration

FAST = Backoff(initial_s=0.01, max_s=0.05, max_attempts=4)


def test_labels_for_joins_the_students_batches(server_factory, teacher_env, direct) -> None:
    """A rank's loader order (with padding) gets its labels by window index."""
    server = server_factory()
    reader = direct.reader
    plan = make_plan(
        reader.windows("train"), reader.store.chunks[0], 3, epoch=1, seed=4, batch_size=40
    )
    rank = max(range(3), key=lambda r: plan.rank(r).padding)  # the rank with the most padding
    assert plan.rank(rank).padding > 0
    entries, valid = plan.rank(rank).entries()
    client = SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, max_message_bytes=8192
    )
    spec = PlanRequest(world_size=3, rank=rank, epoch=1, seed=4, batch_size=40)
    with client, client.stream_plan("train", spec, spread=True) as stream:
        for lo, hi in plan.batch_bounds():
            batch = reader.batch(entries[lo:hi], valid[lo:hi])
            got = stream.labels_for(batch.index, batch.valid)
            pred, spread = got.prediction, got.spread
            assert pred.shape == (hi - lo, 12, 5, 2) and spread is not None
            ok = batch.valid.numpy()
            ref_labels = direct.predict(batch.index.numpy()[ok])
            ref, ref_spread = ref_labels.prediction, ref_labels.spread
            np.testing.assert_allclose(pred.numpy()[ok], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(spread.numpy()[ok], ref_spread, rtol=1e-5, atol=1e-5)
            assert not pred.numpy()[~ok].any()  # padding: zeros, masked out of the loss anyway
        assert list(stream) == []  # every streamed window was handed out
    assert client.stats.windows == len(plan.rank_windows(rank))


def test_corrupted_chunk_is_retried(server_factory, teacher_env, direct, monkeypatch) -> None:
    real = codec.encode_chunk_bytes
    sent = {"n": 0}

    def corrupting(*args: Any, **kwargs: Any) -> codec.EncodedChunk:
        chunk = real(*args, **kwargs)
        sent["n"] += 1
        if sent["n"] == 3:  # flip one bit of the third chunk's label bytes (at the end), once
            data = bytearray(chunk.data)
            data[-5] ^= 0x10
            return dataclasses.replace(chunk, data=bytes(data))
        return chunk

    monkeypatch.setattr(codec, "encode_chunk_bytes", corrupting)
    server = server_factory()
    with SoftLabelClient(
        [server.address],
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=4096,
        backoff=FAST,
    ) as c:
        items = list(c.stream("train", range(0, 100)))
    idx = np.concatenate([i for i, _ in items])
    assert idx.tolist() == list(range(100))
    np.testing.assert_allclose(
        np.concatenate([lab.prediction for _, lab in items]),
        direct.predict(idx).prediction,
        rtol=1e-5,
        atol=1e-5,
    )
    assert c.stats.checksum_failures == 1 and c.stats.reconnects == 1


def test_deadline_expiry_resumes_without_loss(server_factory, teacher_env) -> None:
    server = server_factory()
    with SoftLabelClient(
        [server.address],
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=4096,
        prefetch=1,
        deadline=1.0,
        backoff=Backoff(initial_s=0.01, max_s=0.05, max_attempts=20),
    ) as c:
        got = []
        for idx, _ in c.stream("train", range(0, 397)):
            got.extend(idx.tolist())
            time.sleep(0.03)  # ~66 chunks x 30 ms: calls outlive their 1 s deadline
    assert got == list(range(397))
    assert c.stats.reconnects >= 1


def test_prefetch_is_bounded(server_factory, teacher_env) -> None:
    server = server_factory()
    with SoftLabelClient(
        [server.address],
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=4096,
        prefetch=3,
    ) as c:
        stream = c.stream("train", range(0, 397))
        time.sleep(0.5)  # the consumer does not read
        # queued chunks + the one the reader thread holds
        assert c.stats.chunks <= 3 + 1
        assert sum(len(i) for i, _ in stream) == 397
        stream.close()


def test_version_is_pinned_across_replicas(teacher_env, direct) -> None:
    """A replica serving another teacher version is an error, not a silent switch."""
    a = TeacherServer(direct, ServerConfig(drain_grace_s=0.0))
    other = Teacher(direct.model, direct.reader, "another-teacher-e9-12345678")
    b = TeacherServer(other, ServerConfig())
    a.start()
    b.start()
    try:
        client = SoftLabelClient(
            [a.address, b.address],
            expected_fingerprint=teacher_env.fingerprint,
            max_message_bytes=4096,
            prefetch=1,
            backoff=FAST,
        )
        client.placement._next = 0  # ties go to replica a first
        with client:
            stream = client.stream("train", range(0, 397))
            first, _ = next(stream)
            assert first[0] == 0 and client.stats.endpoints == {a.address}
            assert client.version == teacher_env.version
            a.stop()  # failover can only reach b, which serves another version
            with pytest.raises(LabelMismatchError) as refused:
                list(stream)
        # b refused (or the client caught) the switch: the error names b and both versions
        assert refused.value.where == b.address
        assert other.version in refused.value.message
        assert teacher_env.version in refused.value.message
        assert client.stats.endpoints == {a.address}  # nothing was taken from b
    finally:
        a.stop()
        b.stop()


def test_no_reachable_replica_is_a_clear_error(teacher_env) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SoftLabelClient(
        [f"127.0.0.1:{port}"], expected_fingerprint=teacher_env.fingerprint, backoff=FAST
    )
    with client, pytest.raises(TeacherUnavailableError, match="attempts"):
        list(client.stream("train", range(10)))


def test_dns_name_resolves_to_replicas(server_factory, teacher_env) -> None:
    server = server_factory()
    assert f"127.0.0.1:{server.port}" in resolve_dns("localhost", server.port)
    with SoftLabelClient(
        f"dns:///localhost:{server.port}",
        expected_fingerprint=teacher_env.fingerprint,
        backoff=FAST,
    ) as c:
        assert sum(len(i) for i, _ in c.stream("val", range(420, 440))) == 20


def test_endpoint_specs() -> None:
    assert [e.address for e in EndpointSource("a:1, b:2").resolve()] == ["a:1", "b:2"]
    assert [e.address for e in EndpointSource(["[::1]:5"]).resolve()] == ["[::1]:5"]
    for bad in ("", "nohost", "h:port", "h:0", "dns:///name"):
        with pytest.raises(ConfigError):
            EndpointSource(bad)
    with pytest.raises(ConfigError, match="resolve"):
        EndpointSource("dns:///no-such-host.invalid:5").resolve()
