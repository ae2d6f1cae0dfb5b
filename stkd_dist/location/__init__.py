"""Where bytes live: local paths and object-store URLs behind one small API.

Every file stkd-dist reads or writes under the storage root (stores, label caches, checkpoints,
run records, reports, logs) goes through this module. A *location* is a
:class:`upath.UPath`: a plain local path (``storage/runs/x``, ``file:///data``) is a
``PosixUPath`` (a real :class:`pathlib.Path`), and ``s3://bucket/prefix``, ``gs://…``, ``az://…``
are fsspec-backed paths with the same interface. Nothing else in the package calls ``open()``,
``os.replace`` or ``shutil`` on storage paths.

Endpoint and credentials come from the standard variables each client reads itself
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``) plus optional fsspec options from the
``storage.options`` config section (:func:`set_storage_options`; they travel to Ray workers as
``STKD_STORAGE_OPTIONS``). They are never put on a command line or in a log.

Atomicity: one object PUT is atomic on every object store, so a single file is written whole or not
at all; on a local disk a file is written to a temporary sibling and renamed. A folder of several
files (a Zarr store, a checkpoint) is complete only once its commit marker exists, and the marker is
always written last (see the writers in :mod:`stkd_dist.storage.writer` and
:mod:`stkd_dist.checkpoint`).
"""

from __future__ import annotations

from stkd_dist.location.clients import (
    pyarrow_filesystem,
    ray_location,
    scratch_dir,
    zarr_store,
)
from stkd_dist.location.errors import (
    T,
    is_transient,
    retrying,
    storage_error,
    storage_errors,
)
from stkd_dist.location.files import (
    append_text,
    copy_tree,
    exists,
    listdir,
    makedirs,
    read_bytes,
    read_json,
    read_text,
    remove,
    rename_or_copy,
    temporary_sibling,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from stkd_dist.location.urls import (
    CREDENTIAL_ENV,
    OPTIONS_ENV,
    SCRATCH_ENV,
    Location,
    PathInput,
    absolute,
    as_path,
    is_remote,
    local_path,
    location,
    relative,
    set_storage_options,
    storage_options,
    url,
)

__all__ = [
    "CREDENTIAL_ENV",
    "OPTIONS_ENV",
    "SCRATCH_ENV",
    "Location",
    "PathInput",
    "T",
    "absolute",
    "append_text",
    "as_path",
    "copy_tree",
    "exists",
    "is_remote",
    "is_transient",
    "listdir",
    "local_path",
    "location",
    "makedirs",
    "pyarrow_filesystem",
    "ray_location",
    "read_bytes",
    "read_json",
    "read_text",
    "relative",
    "remove",
    "rename_or_copy",
    "retrying",
    "scratch_dir",
    "set_storage_options",
    "storage_error",
    "storage_errors",
    "storage_options",
    "temporary_sibling",
    "url",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
    "zarr_store",
]
