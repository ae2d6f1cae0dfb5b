"""A real S3-compatible server for tests and benchmarks.

:class:`S3Server` runs moto's server mode in a child process on a free port of 127.0.0.1 (as
s3fs and zarr do in their own test suites), with IAM authentication on: the first requests
(unauthenticated, counted by ``INITIAL_NO_AUTH_ACTION_COUNT``) create a user with an access key,
and every later request must be signed with that key, so wrong credentials fail as they do against
a real service. The code under test only ever sees the standard AWS variables (:meth:`env`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from types import TracebackType
from typing import Any

_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin
server.stop()
"""
_SETUP_REQUESTS = 3  # create_user, put_user_policy, create_access_key
_ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


class S3Server:
    """A real S3-compatible server for the duration of a ``with`` block.

    Attributes (inside the block):
        endpoint: ``http://127.0.0.1:<port>``.
        region: the region the credentials are for.
        client: a boto3 S3 client with the valid credentials (independent of the code under test).
    """

    region = "us-east-1"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._buckets = itertools.count()
        self.endpoint = ""
        self._creds: dict[str, str] = {}
        self.client: Any = None

    def __enter__(self) -> S3Server:
        import boto3

        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its request log
            env=env,
            text=True,
        )
        try:
            line = self._proc.stdout.readline() if self._proc.stdout else ""
            if not line.strip().isdigit():
                raise RuntimeError(f"the S3 server did not start (it printed {line!r})")
            self.endpoint = f"http://127.0.0.1:{int(line)}"
            anon = {"endpoint_url": self.endpoint, "region_name": self.region}
            iam = boto3.client(
                "iam", aws_access_key_id="setup", aws_secret_access_key="setup", **anon
            )
            iam.create_user(UserName="stkd")
            iam.put_user_policy(
                UserName="stkd", PolicyName="all", PolicyDocument=json.dumps(_ALLOW_ALL)
            )
            key = iam.create_access_key(UserName="stkd")["AccessKey"]
            self._creds = {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            }
            self.client = boto3.client(
                "s3",
                aws_access_key_id=key["AccessKeyId"],
                aws_secret_access_key=key["SecretAccessKey"],
                **anon,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def env(self) -> dict[str, str]:
        """The standard variables that point a client at this server with valid credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region, **self._creds}

    def make_bucket(self) -> str:
        """Create a fresh bucket and return its name."""
        name = f"stkd-test-{next(self._buckets)}"
        self.client.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, sorted (listed by boto3, not by the code under test)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
