"""The Ray runtime environment that ``stkd submit`` ships with a job.

A job's entrypoint is the ``stkd`` command a user would type, so the nodes need the package. By
default the source of the running ``stkd_dist`` package is uploaded as a ``py_modules`` entry
(Ray puts it first on ``PYTHONPATH`` for the driver and every worker), which makes the job run
exactly the code of the submitting checkout even when the nodes have an older install. A YAML file
(``--runtime-env``) may add or override any Ray runtime-env field (``working_dir``, ``pip``,
``env_vars``, ``py_modules``, ``excludes``, ...); ``--working-dir`` uploads a directory as the job's
working directory. Local data and environments never travel: ``DEFAULT_EXCLUDES`` is always added.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import stkd_dist
from stkd_dist.errors import ConfigError
from stkd_dist.location import CREDENTIAL_ENV
from stkd_dist.paths import STORAGE_ENV

# gitignore-style patterns, relative to each uploaded directory
DEFAULT_EXCLUDES: tuple[str, ...] = (".venv", "storage", ".git", "__pycache__", "*.pyc")
# environment variables of the submitting shell that the job sees too: the storage root and the
# object-store endpoint and credentials (through the Jobs API's runtime environment, never on the
# entrypoint's command line)
PASSED_ENV: tuple[str, ...] = (STORAGE_ENV, *CREDENTIAL_ENV)
# directories Ray uploads from the client (remote URIs are fetched by the nodes instead)
_UPLOADED_FIELDS = ("working_dir", "py_modules")
_REMOTE_PREFIXES = (
    "s3://",
    "gs://",
    "gcs://",
    "https://",
    "http://",
    "file://",
    "az://",
    "abfss://",
)


@dataclass(frozen=True)
class RuntimeEnvOptions:
    """How to build a job's runtime environment.

    Args:
        file: a YAML file holding a Ray runtime environment (a mapping of runtime-env fields).
        working_dir: a local directory uploaded as the job's working directory.
        ship_source: upload the running ``stkd_dist`` package as ``py_modules`` unless the file
            already sets ``py_modules`` (turn off when the nodes' image has the right version).
        pass_env: environment variables copied into ``env_vars`` when set (and not in the file).
    """

    file: Path | None = None
    working_dir: Path | None = None
    ship_source: bool = True
    pass_env: tuple[str, ...] = field(default=PASSED_ENV)

    def __post_init__(self) -> None:
        if self.file is not None and not Path(self.file).is_file():
            raise ConfigError("no such runtime environment file", where=str(self.file))
        if self.working_dir is not None and not Path(self.working_dir).is_dir():
            raise ConfigError("the working directory does not exist", where=str(self.working_dir))


def package_source_dir() -> Path:
    """Directory of the ``stkd_dist`` package this process runs."""
    return Path(stkd_dist.__file__).resolve().parent


def load_runtime_env_file(path: Path) -> dict[str, Any]:
    """Read and validate a runtime environment YAML file (an empty file is an empty env)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", where=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a runtime environment is a mapping of fields, got {type(data).__name__}",
            where=str(path),
        )
    validate_runtime_env(data, where=str(path))
    return data


def validate_runtime_env(env: Mapping[str, Any], where: str) -> None:
    """Check field names and values with Ray's own ``RuntimeEnv`` parser.

    Ray accepts unknown top-level fields as plugin names and only fails on the cluster, so field
    names are checked against ``RuntimeEnv.known_fields`` here.
    """
    from ray.runtime_env import RuntimeEnv

    unknown = sorted(set(env) - set(RuntimeEnv.known_fields))
    if unknown:
        known = ", ".join(sorted(f for f in RuntimeEnv.known_fields if not f.startswith("_")))
        raise ConfigError(
            f"unknown runtime environment field(s) {', '.join(unknown)} (known: {known})",
            where=where,
        )
    for name in _UPLOADED_FIELDS:
        for entry in _as_list(env.get(name)):
            if isinstance(entry, str) and not _is_remote(entry) and not Path(entry).exists():
                raise ConfigError(
                    f"{name} entry {entry!r} does not exist", where=f"{where}: {name}"
                )
    try:
        RuntimeEnv(**dict(env))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid runtime environment: {e}", where=where) from e


def build_runtime_env(
    options: RuntimeEnvOptions, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The runtime environment to submit, from a file, the options and the environment.

    Precedence: ``options.working_dir`` over the file's ``working_dir``; the file's ``env_vars``
    over passed-through variables; the file's ``py_modules`` replace the shipped source.
    """
    environ = os.environ if environ is None else environ
    env: dict[str, Any] = load_runtime_env_file(options.file) if options.file else {}
    if options.working_dir is not None:
        env["working_dir"] = str(Path(options.working_dir).resolve())
    if options.ship_source and "py_modules" not in env:
        env["py_modules"] = [str(package_source_dir())]

    passed = {name: environ[name] for name in options.pass_env if environ.get(name)}
    if passed:
        env_vars = dict(env.get("env_vars") or {})
        env["env_vars"] = {**passed, **env_vars}

    if any(name in env for name in _UPLOADED_FIELDS):
        excludes = list(env.get("excludes") or [])
        env["excludes"] = excludes + [p for p in DEFAULT_EXCLUDES if p not in excludes]
    validate_runtime_env(env, where="runtime environment")
    return env


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_remote(uri: str) -> bool:
    return uri.startswith(_REMOTE_PREFIXES)
