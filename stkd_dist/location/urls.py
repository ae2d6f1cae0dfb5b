"""Locations: what a path or URL names, and the fsspec options that reach it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from upath import UPath

from stkd_dist.errors import StoreError

Location = UPath
#: what functions taking a place to read or write accept: a path, a path string or URL, a location
PathInput = str | os.PathLike[str] | UPath
OPTIONS_ENV = "STKD_STORAGE_OPTIONS"
SCRATCH_ENV = "STKD_SCRATCH"
# the variables object-store clients read for endpoints and credentials; passed to Ray workers
CREDENTIAL_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    OPTIONS_ENV,
)
_LOCAL_PROTOCOLS = ("", "file", "local")


# -- locations -------------------------------------------------------------------------------
def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for ``protocol`` from ``$STKD_STORAGE_OPTIONS`` (a JSON mapping).

    The mapping is either flat (applied to every remote protocol) or keyed by protocol
    (``{"s3": {...}, "gs": {...}}``).
    """
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text or protocol in _LOCAL_PROTOCOLS:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"not a JSON mapping ({e})", where=OPTIONS_ENV) from e
    if not isinstance(data, dict):
        raise StoreError("must be a JSON mapping of fsspec options", where=OPTIONS_ENV)
    nested = data.get(protocol)
    return (
        dict(nested)
        if isinstance(nested, dict)
        else {k: v for k, v in data.items() if not isinstance(v, dict)}
    )


def set_storage_options(options: Mapping[str, Any]) -> None:
    """Make ``options`` (the ``storage.options`` config section) the fsspec options of this
    process and of the Ray workers it starts (through the environment, never an argument)."""
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(dict(options), sort_keys=True)


def location(ref: PathInput) -> UPath:
    """The location ``ref`` names: a URL (``s3://b/p``, ``file:///p``) or a local path."""
    if isinstance(ref, UPath):
        return ref
    text = os.fspath(ref)
    protocol = text.split("://", 1)[0] if "://" in text else ""
    if protocol in _LOCAL_PROTOCOLS:
        local = text.split("://", 1)[1] if protocol else text
        return UPath(os.path.expanduser(local))
    return UPath(text, **storage_options(protocol))


def is_remote(loc: PathInput) -> bool:
    """True for an object-store (non-local) location."""
    return location(loc).protocol not in _LOCAL_PROTOCOLS


def url(loc: PathInput) -> str:
    """The string form users see: ``s3://bucket/key`` or an absolute local path."""
    loc = location(loc)
    return str(loc) if is_remote(loc) else str(as_path(loc).absolute())


def absolute(loc: PathInput) -> UPath:
    """``loc`` with a local path made absolute (what another process or node can open)."""
    return location(url(loc))


def as_path(loc: PathInput) -> Path:
    """A local place as a :class:`pathlib.Path` (the caller knows it is not remote)."""
    if isinstance(loc, Path):  # also a local UPath (PosixUPath is a Path)
        return loc
    if isinstance(loc, UPath):
        return Path(loc.path)
    return Path(loc)


def relative(loc: UPath, root: UPath) -> str:
    """``loc`` relative to ``root`` (POSIX separators), for records inside a run."""
    return str(location(loc).relative_to(location(root))).replace(os.sep, "/")


def local_path(loc: PathInput, what: str) -> Path:
    """The local path of ``loc``; a remote URL is refused naming ``what`` needs a local file."""
    loc = location(loc)
    if is_remote(loc):
        raise StoreError(f"{what} must be a local path, not an object-store URL", where=url(loc))
    return as_path(loc)
