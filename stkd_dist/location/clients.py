"""The other libraries' handles on a location: zarr stores, pyarrow filesystems (Ray), scratch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from upath import UPath

from stkd_dist.location.urls import SCRATCH_ENV, as_path, is_remote, location, storage_options
from stkd_dist.location.whole_files import whole_file_filesystem


def zarr_store(loc: UPath, read_only: bool = True) -> Any:
    """A zarr store for ``loc``: a ``LocalStore`` path or zarr's own ``FsspecStore``."""
    loc = location(loc)
    if not is_remote(loc):
        return str(as_path(loc))
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(
        str(loc), storage_options=storage_options(loc.protocol), read_only=read_only
    )


def pyarrow_filesystem(loc: UPath) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for Ray Train/Tune's ``storage_path``.

    A local path gives the :func:`~stkd_dist.location.whole_files.whole_file_filesystem` and
    the absolute path: a Ray process killed while it writes its state there leaves the previous
    file, not one cut short. A remote URL gives pyarrow's own filesystem for it (which reads
    ``AWS_ENDPOINT_URL`` and the credentials itself) wrapped around fsspec's when fsspec
    options are configured, so Ray and stkd-dist reach the same endpoint.
    """
    loc = location(loc)
    if not is_remote(loc):
        return whole_file_filesystem(), str(as_path(loc).absolute())
    import pyarrow.fs as pafs

    if storage_options(loc.protocol):
        return pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs)), loc.path
    fs, path = pafs.FileSystem.from_uri(str(loc))
    return fs, path


def ray_location(path: str, like: UPath) -> UPath:
    """The location of a path Ray Train/Tune reports (``bucket/key``, no scheme, when its
    storage is an object store) inside storage root ``like``."""
    like = location(like)
    if is_remote(like) and "://" not in path:
        return location(f"{like.protocol}://{path}")
    return location(path)


def scratch_dir(what: str) -> Path:
    """A local scratch folder for files that must exist on a local disk while in use.

    ``$STKD_SCRATCH`` (default: the system temporary directory) / ``stkd-<what>-<random>``.
    Nothing is kept there: callers upload what must last and delete the folder.
    """
    base = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"stkd-{what}-", dir=base))
