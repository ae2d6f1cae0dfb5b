"""`stkd submit/jobs/logs/stop/cluster`: argument handling and exit statuses (fake Jobs client)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from stkd_dist.cli import build_parser, main
from stkd_dist.commands import jobs as jobs_cmd
from stkd_dist.commands import logs as logs_cmd
from stkd_dist.commands import stop as stop_cmd
from stkd_dist.commands import submit as submit_cmd
from stkd_dist.ops.jobs import JobSummary


class FakeJobs:
    """Stands in for stkd_dist.ops.jobs.JobsClient."""

    final = JobSummary("raysubmit_1", "SUCCEEDED", "stkd x", driver_exit_code=0)
    calls: list[tuple[str, Any]] = []  # noqa: RUF012 - shared record of the fake on purpose

    def __init__(self, address: str | None = None) -> None:
        self.address = address or "http://127.0.0.1:8265"
        FakeJobs.calls.append(("init", address))

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], **kw: Any) -> str:
        FakeJobs.calls.append(("submit", (entrypoint, runtime_env, kw)))
        return kw.get("job_id") or "raysubmit_1"

    def follow(self, job_id: str, write: Any) -> JobSummary:
        write("hello from the job\n")
        return FakeJobs.final

    def list_jobs(self) -> list[JobSummary]:
        return [FakeJobs.final, JobSummary("j2", "RUNNING", "stkd sweep --config c.yaml")]

    def logs(self, job_id: str) -> str:
        return f"logs of {job_id}\n"

    def stop(self, job_id: str) -> bool:
        return job_id != "done"

    def info(self, job_id: str) -> JobSummary:
        return FakeJobs.final

    def wait(self, job_id: str, timeout: float | None = None) -> JobSummary:
        return JobSummary(job_id, "STOPPED", "stkd x")


@pytest.fixture
def fake_jobs(monkeypatch: pytest.MonkeyPatch) -> type[FakeJobs]:
    FakeJobs.calls = []
    FakeJobs.final = JobSummary("raysubmit_1", "SUCCEEDED", "stkd x", driver_exit_code=0)
    for module in (submit_cmd, jobs_cmd, logs_cmd, stop_cmd):
        monkeypatch.setattr(module, "JobsClient", FakeJobs)
    # set, then delete: monkeypatch restores the original value after `main --storage` sets it
    monkeypatch.setenv("STKD_STORAGE", "unset")
    monkeypatch.delenv("STKD_STORAGE")
    return FakeJobs


def test_submit_parses_everything_after_the_double_dash() -> None:
    args = build_parser().parse_args(
        ["submit", "--address", "http://h:8265", "--no-wait", "--", "synth", "--nodes", "5"]
    )
    assert args.address == "http://h:8265" and args.no_wait
    assert args.command == ["--", "synth", "--nodes", "5"]


def test_submit_runs_the_command_and_returns_the_job_status(
    fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        ["--storage", str(tmp_path), "submit", "--job-id", "my-job", "--", "info", "demo", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "hello from the job\n"  # the job's output, and only it, on stdout
    assert "SUCCEEDED" in err and "exit status 0" in err
    kind, (entrypoint, runtime_env, kw) = fake_jobs.calls[1]
    assert kind == "submit"
    assert entrypoint == "stkd info demo --json"
    assert kw["job_id"] == "my-job"
    assert runtime_env["py_modules"] and ".venv" in runtime_env["excludes"]
    # the global --storage reaches the job
    assert runtime_env["env_vars"] == {"STKD_STORAGE": str(tmp_path)}


def test_submit_returns_the_jobs_own_exit_code(
    fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_jobs.final = JobSummary(
        "raysubmit_1",
        "FAILED",
        "stkd x",
        message="Job entrypoint command failed with exit code 2, last logs:\nusage: ...",
        driver_exit_code=2,
    )
    assert main(["submit", "--", "info", "nope"]) == 2
    err = capsys.readouterr().err
    assert "FAILED" in err and "usage: ..." not in err


def test_submit_no_wait_prints_the_id(
    fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "--no-wait", "--no-ship-source", "--", "sweep"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "raysubmit_1"
    _, (_, runtime_env, _) = fake_jobs.calls[1]
    assert "py_modules" not in runtime_env


def test_submit_without_a_command_is_a_usage_error(
    fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "--"]) == 2
    assert "COMMAND: give the stkd command" in capsys.readouterr().err


def test_jobs_json_and_table(fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in listed] == ["raysubmit_1", "j2"]
    assert main(["jobs"]) == 0
    table = capsys.readouterr().out
    assert "raysubmit_1" in table and "RUNNING" in table


def test_logs_and_follow(fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", "abc"]) == 0
    assert capsys.readouterr().out == "logs of abc\n"
    assert main(["logs", "abc", "--follow"]) == 0
    assert capsys.readouterr().out == "hello from the job\n"


def test_stop_running_and_finished_jobs(
    fake_jobs: type[FakeJobs], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stop", "abc"]) == 0
    assert "abc STOPPED" in capsys.readouterr().err
    assert main(["stop", "done"]) == 0
    assert "had already ended" in capsys.readouterr().err


def test_unreachable_address_is_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    # a real client against a port where nothing listens
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["jobs", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stkd: error: http://127.0.0.1:{port}: cannot reach the Ray Jobs API")
    assert "stkd cluster local start" in err
    assert "Traceback" not in err


def test_cluster_subcommands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["cluster", "local", "start", "--workers", "3", "--cpus-per-node", "2", "--port", "7000"]
    )
    assert (args.workers, args.cpus_per_node, args.port) == (3, 2, 7000)
    assert args.func.__name__ == "run_start"
    assert parser.parse_args(["cluster", "local", "status", "--json"]).func.__name__ == "run_status"
    assert parser.parse_args(["cluster", "probe"]).func.__name__ == "run_probe"
    with pytest.raises(SystemExit):
        parser.parse_args(["cluster", "local"])


def test_probe_needs_a_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["cluster", "probe"]) == 2
    assert "no cluster to probe" in capsys.readouterr().err


def test_local_status_without_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "local", "status", "--state-dir", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["running"] is False
