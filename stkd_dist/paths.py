"""Where stkd-dist keeps its files.

The storage root holds datasets (``datasets/NAME.zarr``), soft-label caches, checkpoints and runs
(``runs/RUN``). It is ``storage/`` in the current directory by default; ``STKD_STORAGE`` or the
``--storage`` option moves it: a local path, a mounted volume, or an object-store URL
(``s3://bucket/prefix``, ``gs://…``, ``az://…``, ``file://…``; see :mod:`stkd_dist.location`).
"""

from __future__ import annotations

import os
import re

from stkd_dist.errors import StoreError
from stkd_dist.location import Location, PathInput, exists, location, url

STORAGE_ENV = "STKD_STORAGE"
DEFAULT_STORAGE = "storage"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def storage_root(override: PathInput | None = None) -> Location:
    """Return the storage root: ``override``, else ``$STKD_STORAGE``, else ``./storage``."""
    if override:
        return location(override)
    return location(os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE)


def check_name(name: str, what: str = "name") -> str:
    """Validate a dataset or run name (letters, digits, ``_.-``; no path separators)."""
    if not _NAME_RE.match(name) or name.endswith(".zarr"):
        raise StoreError(
            f"{name!r} is not a valid {what}: use letters, digits, '_', '.' or '-' "
            "(no slashes, no '.zarr' suffix)",
            where=f"--{what}",
        )
    return name


def dataset_path(name: str, storage: PathInput | None = None) -> Location:
    """Path of the store of dataset ``name`` under the storage root."""
    return storage_root(storage) / "datasets" / f"{check_name(name)}.zarr"


def resolve_dataset(ref: PathInput | Location, storage: PathInput | None = None) -> Location:
    """Resolve a dataset given as a store path or as a name under ``<storage>/datasets``.

    A reference that exists as a path wins; otherwise a plain name is looked up in the storage
    root. Raises :class:`StoreError` naming both places when neither exists.
    """
    path = location(ref)
    text = str(ref) if isinstance(ref, Location) else os.fspath(ref)
    plain_name = _NAME_RE.match(text) is not None and not text.endswith(".zarr")
    # a plain name that is not a folder here is looked up in the storage root
    if (not plain_name or path.protocol) and exists(path):
        return path
    if plain_name and not path.protocol and path.exists():
        return path
    if plain_name:
        named = dataset_path(text, storage)
        if exists(named):
            return named
        raise StoreError(
            f"no store at {url(path)} and no dataset named {text!r} at {url(named)} "
            "(create one with `stkd ingest` or `stkd synth`)",
            where=text,
        )
    raise StoreError("no such store (give a store path or a dataset name)", where=str(ref))


def run_dir(run_name: str, storage: PathInput | None = None) -> Location:
    """Directory of run ``run_name``: ``<storage>/runs/<run_name>``."""
    return storage_root(storage) / "runs" / check_name(run_name, "run-name")
