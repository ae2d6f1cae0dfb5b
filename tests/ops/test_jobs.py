"""Jobs API wrapper: addresses, entrypoints, auth headers, error mapping, following a job.

The Ray client is replaced by a fake here (our own logic only); the real Jobs API is exercised by
the local-cluster integration test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray.job_submission
from ray.exceptions import AuthenticationError

from stkd_dist.errors import ConfigError
from stkd_dist.ops import jobs as jobs_mod
from stkd_dist.ops.jobs import (
    DEFAULT_ADDRESS,
    ClusterUnreachable,
    JobsClient,
    JobSummary,
    UnknownJobError,
    build_entrypoint,
    resolve_address,
)
from stkd_dist.ops.ray_auth import auth_headers, cluster_env


@pytest.mark.parametrize(
    ("argv", "entrypoint"),
    [
        (["--", "distill", "--config", "run.yaml"], "stkd distill --config run.yaml"),
        (["distill", "--config", "run.yaml"], "stkd distill --config run.yaml"),
        (["--", "stkd", "info", "demo", "--json"], "stkd info demo --json"),
        (["--", "--storage", "/mnt/x", "info", "a b"], "stkd --storage /mnt/x info 'a b'"),
        (["synth --name a && stkd info a"], "stkd synth --name a && stkd info a"),
        (["stkd synth --name a | tee log"], "stkd synth --name a | tee log"),
        (["--", "info"], "stkd info"),
    ],
)
def test_entrypoint_is_the_stkd_command_a_user_types(argv: list[str], entrypoint: str) -> None:
    assert build_entrypoint(argv) == entrypoint


@pytest.mark.parametrize("argv", [[], ["--"], ["--", "stkd"]])
def test_entrypoint_without_a_command_is_refused(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="give the stkd command"):
        build_entrypoint(argv)


def test_address_precedence() -> None:
    env = {"RAY_ADDRESS": "http://b:8265", "RAY_API_SERVER_ADDRESS": "http://a:8265/"}
    assert resolve_address("http://explicit:8265/", env) == "http://explicit:8265"
    assert resolve_address(None, env) == "http://a:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://b:8265"}) == "http://b:8265"
    assert resolve_address(None, {}) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"


def test_summary_exit_status_and_json() -> None:
    details = SimpleNamespace(
        submission_id="job-1",
        job_id="02000000",
        status="FAILED",
        entrypoint="stkd info x",
        message="Job entrypoint command failed with exit code 2",
        start_time=1_700_000_000_000,
        end_time=1_700_000_005_000,
        driver_exit_code=2,
    )
    job = JobSummary.from_details(details)
    assert job.job_id == "job-1" and job.terminal
    assert job.exit_status() == 2
    assert (job.end_time - job.start_time).total_seconds() == 5.0
    assert job.to_json()["start_time"].startswith("2023-11-1")
    assert JobSummary("a", "SUCCEEDED", "stkd x").exit_status() == 0
    assert JobSummary("a", "STOPPED", "stkd x").exit_status() == 1
    assert JobSummary("a", "FAILED", "stkd x", driver_exit_code=None).exit_status() == 1
    assert not JobSummary("a", "RUNNING", "stkd x").terminal


# ----------------------------------------------------------------------------- auth headers


def test_auth_header_from_the_token_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc123")
    assert auth_headers() == {"Authorization": "Bearer abc123"}


def test_no_token_anywhere_means_no_header(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == {}


def test_token_file_is_read_and_a_missing_one_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        auth_headers()


def test_cluster_env_turns_token_auth_on_unless_chosen() -> None:
    env = cluster_env({"PATH": "/usr/bin"})
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["PATH"].split(os.pathsep)[1] == "/usr/bin"
    assert cluster_env({"RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"] == "disabled"


# ----------------------------------------------------------------------------- client


class FakeRayClient:
    """Stands in for JobSubmissionClient; records what stkd asked for."""

    instances: list[FakeRayClient] = []  # noqa: RUF012 - shared by the fake's class on purpose
    fail_with: BaseException | None = None

    def __init__(self, address: str, headers: dict[str, str] | None = None, **_: Any) -> None:
        if FakeRayClient.fail_with is not None:
            raise FakeRayClient.fail_with
        self.address = address
        self.headers = headers
        self.env_at_init = {k: os.environ.get(k) for k in ("RAY_ADDRESS",)}
        self.statuses = ["RUNNING", "RUNNING", "SUCCEEDED"]
        self.chunks = ["line 1\n", "line 2\n"]
        self.tail_error: Exception | None = None
        self.submitted: dict[str, Any] = {}
        FakeRayClient.instances.append(self)

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        if job_id == "missing":
            raise RuntimeError("Request failed with status code 404: Job missing does not exist.")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(
            submission_id=job_id,
            job_id=None,
            status=status,
            entrypoint="stkd x",
            message="",
            start_time=None,
            end_time=None,
            driver_exit_code=0 if status == "SUCCEEDED" else None,
        )

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for chunk in self.chunks:
            yield chunk
        if self.tail_error is not None:
            raise self.tail_error

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted = kwargs
        if kwargs.get("submission_id") == "taken":
            raise RuntimeError(
                "Request failed with status code 500: Job with submission_id taken already exists."
            )
        return kwargs.get("submission_id") or "raysubmit_1"

    def get_job_logs(self, job_id: str) -> str:
        self.get_job_info(job_id)
        return "all logs\n"


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> type[FakeRayClient]:
    FakeRayClient.instances = []
    FakeRayClient.fail_with = None
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeRayClient)
    monkeypatch.setattr(jobs_mod.time, "sleep", lambda _s: None)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    return FakeRayClient


def test_explicit_address_wins_over_ray_address_env(
    fake_ray: type[FakeRayClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    client = JobsClient("http://head:8265")
    fake = fake_ray.instances[0]
    assert fake.address == "http://head:8265"
    # Ray would let RAY_ADDRESS override the argument: it is hidden while the client is built...
    assert fake.env_at_init == {"RAY_ADDRESS": None}
    # ...and restored afterwards
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert fake.headers == {"Authorization": "Bearer tok"}
    assert client.address == "http://head:8265"


def test_unreachable_cluster_is_one_line_naming_the_address(
    fake_ray: type[FakeRayClient],
) -> None:
    fake_ray.fail_with = ConnectionError("Failed to connect to Ray at address: http://h:1.")
    with pytest.raises(ClusterUnreachable) as err:
        JobsClient("http://h:1")
    text = str(err.value)
    assert text.startswith("http://h:1: cannot reach the Ray Jobs API")
    assert "stkd cluster local start" in text and "\n" not in text


def test_refused_token_says_how_to_fix_it(fake_ray: type[FakeRayClient]) -> None:
    fake_ray.fail_with = AuthenticationError("Authentication failed: Forbidden")
    with pytest.raises(ClusterUnreachable, match="the token sent is not the cluster's"):
        JobsClient("http://h:8265")


def test_unknown_job_id(fake_ray: type[FakeRayClient]) -> None:
    client = JobsClient("http://h:8265")
    with pytest.raises(UnknownJobError) as err:
        client.info("missing")
    assert str(err.value).startswith("missing: no such job on http://h:8265")
    with pytest.raises(UnknownJobError):
        client.logs("missing")
    with pytest.raises(UnknownJobError):
        client.follow("missing", print)


def test_taken_job_id_is_a_config_error(fake_ray: type[FakeRayClient]) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        JobsClient("http://h:8265").submit("stkd x", {}, job_id="taken")


def test_follow_streams_then_waits_for_the_final_status(fake_ray: type[FakeRayClient]) -> None:
    client = JobsClient("http://h:8265")
    seen: list[str] = []
    job = client.follow("j1", seen.append)
    assert seen == ["line 1\n", "line 2\n"]
    assert job.status == "SUCCEEDED" and job.exit_status() == 0


def test_broken_log_stream_still_returns_the_final_status(fake_ray: type[FakeRayClient]) -> None:
    client = JobsClient("http://h:8265")
    fake = fake_ray.instances[0]
    fake.tail_error = RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
    fake.statuses = ["RUNNING", "RUNNING", "RUNNING", "FAILED"]
    seen: list[str] = []
    job = client.follow("j1", seen.append)
    assert seen == ["line 1\n", "line 2\n"]
    assert job.status == "FAILED" and job.exit_status() == 1
