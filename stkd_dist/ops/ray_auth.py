"""Ray token authentication for stkd's clients and for the Ray processes stkd starts.

Ray (2.52+) authenticates every dashboard, Jobs API and GCS request with one static token when
``RAY_AUTH_MODE=token``; local clusters turn it on by default. Ray looks for the token in this
order: ``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH`` (a file), then
``~/.ray/auth_token`` (written by ``ray get-auth-token --generate`` or by a local ``ray.init()``).

Ray's HTTP clients attach the token only when the *client* process itself runs with
``RAY_AUTH_MODE=token``. A laptop submitting to a remote cluster usually does not, so stkd loads
the token the same way ``ray get-auth-token`` does and sends it as an ``Authorization: Bearer``
header explicitly; a cluster without authentication ignores the header.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from stkd_dist.errors import ConfigError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def auth_token() -> str | None:
    """The Ray authentication token visible to this process, or ``None`` when there is none.

    Raises:
        ConfigError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty.
    """
    # a Cython class: Ray's type stub of the extension module does not list it
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    # the loader caches its first answer; environment variables may have changed since
    loader.reset_cache()
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        token = loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError as e:
        raise ConfigError(
            f"cannot read the Ray authentication token from "
            f"{os.environ.get(TOKEN_PATH_ENV, '')!r} (the file is missing or empty); "
            "point it at the cluster's token file or unset it",
            where=TOKEN_PATH_ENV,
        ) from e
    return token or None


def auth_headers() -> dict[str, str]:
    """HTTP headers that authenticate to a Ray dashboard / Jobs API (empty without a token)."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def cluster_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the Ray processes of a cluster stkd starts.

    Token authentication is on unless the caller chose a mode (``RAY_AUTH_MODE=disabled`` opts
    out), and the directory of this interpreter comes first on ``PATH`` so that jobs resolve
    ``stkd`` and ``ray`` to the installation that started the cluster.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault(AUTH_MODE_ENV, "token")
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
    return env


def token_auth_enabled(env: Mapping[str, str]) -> bool:
    """Whether ``env`` turns Ray token authentication on."""
    return env.get(AUTH_MODE_ENV, "").lower() == "token"


def ensure_token(ray_executable: str, env: Mapping[str, str]) -> None:
    """Create the default token file when token auth is on and no token exists anywhere.

    Runs ``ray get-auth-token --generate`` (the documented way) with its output discarded, so the
    token never reaches a terminal or a log.
    """
    if not token_auth_enabled(env) or auth_token() is not None:
        return
    subprocess.run(
        [ray_executable, "get-auth-token", "--generate"],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
