"""Ray Jobs API client: submit ``stkd`` commands to a cluster, follow, list and stop them.

A thin layer over ``ray.job_submission.JobSubmissionClient`` that adds what the CLI needs: the
address resolution of ``stkd`` (``--address``, ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS``,
``http://127.0.0.1:8265``), token authentication (:mod:`stkd_dist.ops.ray_auth`), one-line errors
for an unreachable cluster or an unknown job id, and a typed :class:`JobSummary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stkd_dist.errors import ConfigError, StkdError
from stkd_dist.ops.ray_auth import auth_headers

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)
START_HINT = (
    "start a local cluster with `stkd cluster local start`, or give the dashboard address of a "
    "running cluster with --address http://HEAD:8265 (or RAY_ADDRESS)"
)


class ClusterUnreachable(StkdError):
    """The Jobs API of a Ray cluster cannot be reached (or refuses our credentials)."""


class UnknownJobError(StkdError):
    """A job id that the cluster does not know."""


@dataclass(frozen=True)
class JobSummary:
    """What a cluster knows about one job.

    Attributes:
        job_id: the submission id (``raysubmit_...`` or the id given at submission).
        status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED.
        entrypoint: the shell command the job runs.
        message: Ray's explanation of the status.
        start_time / end_time: wall-clock times, ``None`` while unknown.
        driver_exit_code: exit status of the entrypoint once it ended (``None`` before or when
            Ray could not tell).
    """

    job_id: str
    status: str
    entrypoint: str
    message: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    driver_exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (SUCCEEDED, FAILED or STOPPED)."""
        return self.status in TERMINAL_STATUSES

    def exit_status(self) -> int:
        """The exit status ``stkd submit`` returns: 0 on success, the job's own code otherwise.

        A failed job that did not report a positive exit code (stopped, crashed node, failed
        runtime environment) gives 1.
        """
        if self.status == "SUCCEEDED":
            return 0
        if self.driver_exit_code is not None and self.driver_exit_code > 0:
            return self.driver_exit_code
        return 1

    @classmethod
    def from_details(cls, details: Any) -> JobSummary:
        """Convert Ray's ``JobDetails``."""
        status = getattr(details.status, "value", details.status)
        return cls(
            job_id=details.submission_id or details.job_id or "",
            status=str(status),
            entrypoint=details.entrypoint or "",
            message=details.message or "",
            start_time=_from_ms(details.start_time),
            end_time=_from_ms(details.end_time),
            driver_exit_code=getattr(details, "driver_exit_code", None),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (times as ISO 8601)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "entrypoint": self.entrypoint,
            "message": self.message,
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "driver_exit_code": self.driver_exit_code,
        }


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The Jobs API address: ``address``, else RAY_API_SERVER_ADDRESS, RAY_ADDRESS, the default.

    An address without a scheme (``host:6379``) is a cluster (GCS) address that Ray resolves to
    its dashboard; give ``http://HOST:8265`` to talk to the Jobs API directly.
    """
    environ = os.environ if environ is None else environ
    if address:
        return address.rstrip("/")
    for name in ADDRESS_ENV_VARS:
        if environ.get(name):
            return environ[name].rstrip("/")
    return DEFAULT_ADDRESS


def build_entrypoint(command: Sequence[str]) -> str:
    """The shell entrypoint of a job: ``stkd`` followed by ``command``.

    ``command`` is the argument list after ``--`` (a leading ``--`` or ``stkd`` is dropped).
    Several arguments are quoted for the shell one by one; a single argument that contains
    whitespace is taken as shell text, so ``"synth --name a && stkd info a"`` runs two commands.
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "stkd":
        args = args[1:]
    if not args:
        raise ConfigError(
            "give the stkd command the job runs after '--', e.g. "
            "`stkd submit -- distill --config run.yaml`",
            where="COMMAND",
        )
    if len(args) == 1 and any(ch.isspace() for ch in args[0]):
        text = args[0].strip()
        if text.startswith("stkd "):
            text = text[len("stkd ") :].lstrip()
        return f"stkd {text}"
    return "stkd " + shlex.join(args)


class JobsClient:
    """A connection to the Jobs API of one Ray cluster.

    Args:
        address: dashboard address ``http://HEAD:8265`` (see :func:`resolve_address`).

    Raises:
        ClusterUnreachable: nothing answers at the address, or it refuses the token.
    """

    def __init__(self, address: str | None = None) -> None:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        _quiet_client_logs()
        headers = auth_headers()
        try:
            with address_env_cleared():
                self._client = JobSubmissionClient(self.address, headers=headers)
        except AuthenticationError as e:
            raise ClusterUnreachable(
                "the cluster refused the request: token authentication is on and "
                + ("the token sent is not the cluster's" if headers else "no token was found")
                + " (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token, "
                "or run `ray get-auth-token` on the head node)",
                where=self.address,
            ) from e
        except (ConnectionError, OSError, RuntimeError, ValueError) as e:
            raise ClusterUnreachable(
                f"cannot reach the Ray Jobs API ({_first_line(e)}) - {START_HINT}",
                where=self.address,
            ) from e

    def submit(
        self,
        entrypoint: str,
        runtime_env: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Submit ``entrypoint`` and return its job id (``job_id`` when given)."""
        try:
            return self._client.submit_job(
                entrypoint=entrypoint,
                runtime_env=dict(runtime_env or {}),
                submission_id=job_id,
                metadata=dict(metadata or {}),
            )
        except RuntimeError as e:
            if job_id and "already exists" in str(e):
                raise ConfigError(
                    "a job with this id already exists on the cluster; choose another id",
                    where=f"--job-id {job_id}",
                ) from e
            raise StkdError(
                f"the cluster did not accept the job: {_first_line(e)}", where=self.address
            ) from e

    def info(self, job_id: str) -> JobSummary:
        """The current state of a job."""
        with self._job_errors(job_id):
            return JobSummary.from_details(self._client.get_job_info(job_id))

    def list_jobs(self) -> list[JobSummary]:
        """Every job the cluster knows, oldest first."""
        jobs = [JobSummary.from_details(d) for d in self._client.list_jobs()]
        epoch = dt.datetime.fromtimestamp(0, tz=dt.UTC)
        return sorted(jobs, key=lambda j: (j.start_time or epoch, j.job_id))

    def logs(self, job_id: str) -> str:
        """Everything the job has printed so far."""
        with self._job_errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        """Ask a job to stop; ``True`` if it was still running."""
        with self._job_errors(job_id):
            return self._client.stop_job(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> JobSummary:
        """Block until the job ends (or ``timeout`` seconds pass) and return its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.info(job_id)
            if job.terminal or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll)

    def follow(self, job_id: str, write: Callable[[str], object]) -> JobSummary:
        """Stream the job's output to ``write`` until it ends, then return its final state."""
        self.info(job_id)  # an unknown id fails here, with the clear error

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        try:
            asyncio.run(tail())
        except RuntimeError as e:
            # the log stream broke (head restarted, proxy timeout); the job may still be running
            log.warning("log stream of job %s ended early (%s); waiting for it", job_id, e)
        # the log socket closes when the driver exits, a moment before the status is final
        return self.wait(job_id)

    @contextlib.contextmanager
    def _job_errors(self, job_id: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                raise UnknownJobError(
                    f"no such job on {self.address} (list them with `stkd jobs --address "
                    f"{self.address}`)",
                    where=job_id,
                ) from e
            raise StkdError(f"the Jobs API failed: {_first_line(e)}", where=self.address) from e


@contextlib.contextmanager
def address_env_cleared() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while a Ray client resolves its address.

    Ray lets these variables override an explicit address argument; stkd's ``--address`` must
    win (the default already falls back to them in :func:`resolve_address`).
    """
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV_VARS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _quiet_client_logs() -> None:
    """Keep Ray's client-side INFO chatter (package upload, socket closed) out of job output."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return  # --debug shows everything
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _from_ms(value: int | float | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromtimestamp(value / 1000.0, tz=dt.UTC).astimezone()


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
