"""Locations: local paths and object-store URLs behind one API (stkd_dist.location)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stkd_dist import location as loc
from stkd_dist.errors import StoreError
from stkd_dist.location import errors as loc_errors
from stkd_dist.location import files as loc_files


def test_local_paths_and_urls_are_told_apart(tmp_path: Path) -> None:
    assert not loc.is_remote(tmp_path)
    assert not loc.is_remote(f"file://{tmp_path}")
    assert loc.location(f"file://{tmp_path}/x") == loc.location(tmp_path / "x")
    assert isinstance(loc.location(tmp_path), Path)  # local locations are real pathlib paths
    s3 = loc.location("s3://bucket/prefix/run")
    assert loc.is_remote(s3)
    assert loc.url(s3 / "metrics.json") == "s3://bucket/prefix/run/metrics.json"
    assert loc.relative(s3 / "a" / "b.json", s3) == "a/b.json"
    assert str(loc.ray_location("bucket/prefix/run/epoch_0000", s3)) == (
        "s3://bucket/prefix/run/epoch_0000"
    )


def test_atomic_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    target = loc.location(tmp_path / "deep" / "m.json")
    loc.write_json_atomic(target, {"a": 1})
    loc.write_json_atomic(target, {"a": 2})
    assert loc.read_json(target) == {"a": 2}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["m.json"]
    with pytest.raises(ValueError):  # NaN is not JSON: nothing is written
        loc.write_json_atomic(target, {"a": float("nan")})
    assert json.loads((tmp_path / "deep" / "m.json").read_text()) == {"a": 2}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["m.json"]


def test_copy_tree_writes_the_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("meta.json", "a.pt", "sub/b.pt"):
        (src / name).write_text(name)
    order: list[str] = []
    real = loc_files.write_bytes_atomic

    def recording(target: Any, data: bytes) -> None:
        order.append(loc.relative(target, loc.location(tmp_path / "dst")))
        real(target, data)

    monkeypatch.setattr(loc_files, "write_bytes_atomic", recording)
    # a local-to-local copy goes through the bytes path only when one side is remote: force it
    monkeypatch.setattr(loc_files, "is_remote", lambda x: str(x).endswith("dst"))
    loc.copy_tree(loc.location(src), loc.location(tmp_path / "dst"), last=("meta.json",))
    assert order[-1] == "meta.json" and sorted(order) == ["a.pt", "meta.json", "sub/b.pt"]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (FileNotFoundError("The specified bucket does not exist"), "bucket does not exist"),
        (PermissionError("Forbidden"), "access denied"),
        (OSError("InvalidAccessKeyId: the key is unknown"), "access denied"),
        (
            RuntimeError("NoCredentialsError: Unable to locate credentials"),
            "no object-store credentials",
        ),
    ],
)
def test_storage_errors_are_named(error: Exception, words: str) -> None:
    found = loc.storage_error(error, "s3://b/k")
    assert found is not None and words in found.message and found.where == "s3://b/k"


def test_transient_errors_are_retried_and_others_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loc_errors.time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("read timed out")
        return "ok"

    assert loc.retrying(flaky, "s3://b/k") == "ok" and len(calls) == 3

    def always_503() -> None:
        raise OSError("503 ServiceUnavailable: SlowDown")

    with pytest.raises(StoreError, match="storage unavailable after 5 attempts"):
        loc.retrying(always_503, "s3://b/k")

    def bad_bytes() -> None:
        calls.append(1)
        raise ValueError("zstd: invalid frame")

    calls.clear()
    with pytest.raises(ValueError):
        loc.retrying(bad_bytes, "s3://b/k")
    assert len(calls) == 1  # not retried, and not called a storage problem


def test_storage_options_flat_or_per_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loc.OPTIONS_ENV, json.dumps({"s3": {"anon": True}, "gs": {"token": "x"}}))
    assert loc.storage_options("s3") == {"anon": True}
    assert loc.storage_options("file") == {}
    monkeypatch.setenv(loc.OPTIONS_ENV, json.dumps({"anon": True}))
    assert loc.storage_options("s3") == {"anon": True}
    monkeypatch.setenv(loc.OPTIONS_ENV, "[1]")
    with pytest.raises(StoreError, match="STKD_STORAGE_OPTIONS"):
        loc.storage_options("s3")


def test_s3_round_trip_through_the_real_server(s3_env: Any) -> None:
    bucket = s3_env.make_bucket()
    root = loc.location(f"s3://{bucket}/root")
    assert not loc.exists(root / "x.json")
    loc.write_json_atomic(root / "x.json", {"v": 1})
    loc.append_text(root / "log.txt", "a\n")
    loc.append_text(root / "log.txt", "b\n")
    assert loc.read_json(root / "x.json") == {"v": 1}
    assert loc.read_text(root / "log.txt") == "a\nb\n"
    assert [p.name for p in loc.listdir(root)] == ["log.txt", "x.json"]
    loc.copy_tree(root, loc.location(f"s3://{bucket}/copy"), last=("x.json",))
    assert s3_env.objects(bucket, "copy/") == ["copy/log.txt", "copy/x.json"]
    loc.remove(root)
    assert s3_env.objects(bucket, "root/") == []
    with pytest.raises(StoreError, match="bucket does not exist"):
        loc.exists(loc.location("s3://no-such-bucket-at-all/x"))
