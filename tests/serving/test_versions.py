"""Which teacher version a stream is bound to, and when old versions close (own logic, no
server: versions are stand-ins with the attributes the set reads)."""

from __future__ import annotations

import grpc
import pytest

from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.requests import RequestError
from stkd_dist.serving.versions import VersionSet


class _Version:
    def __init__(self, version: str, fingerprint: str) -> None:
        self.version, self.fingerprint = version, fingerprint
        self.streams, self.retired, self.closed = 0, False, False

    def close(self) -> None:
        self.closed = True


def _request(fingerprint: str, version: str = "") -> pb.LabelRequest:
    return pb.LabelRequest(dataset_fingerprint=fingerprint, teacher_version=version)


def test_a_stream_keeps_its_version_and_new_streams_get_the_newest() -> None:
    v1, v2, v3 = _Version("v1", "fp1"), _Version("v2", "fp2"), _Version("v3", "fp3")
    versions = VersionSet(v1, keep=2)  # type: ignore[arg-type]
    running = versions.acquire(_request("fp1"))
    assert running is v1
    versions.publish(v2)  # type: ignore[arg-type]
    assert versions.newest is v2
    assert versions.acquire(_request("fp2")) is v2  # the grown store's students
    assert versions.acquire(_request("fp1")) is v1  # the old store's, on the newest of theirs
    assert versions.acquire(_request("fp2", "v1")) is v1  # a pinned (resumed) stream
    versions.release(v2)
    versions.release(v1)
    # a third version retires v1 for new streams; it closes when its last stream ends
    versions.publish(v3)  # type: ignore[arg-type]
    assert v1.retired and not v1.closed and v1.streams == 2
    with pytest.raises(RequestError) as err:
        versions.acquire(_request("fp1", "v1"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves teacher v2, v3" in err.value.message
    versions.release(v1)
    assert not v1.closed
    versions.release(v1)
    assert v1.closed and versions.all() == [v2, v3]
    assert not v2.closed


def test_publishing_a_version_twice_is_refused() -> None:
    versions = VersionSet(_Version("v1", "fp"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already served"):
        versions.publish(_Version("v1", "fp"))  # type: ignore[arg-type]
