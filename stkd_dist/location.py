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
:mod:`stkd_dist.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from upath import UPath

from stkd_dist.errors import StoreError

Location = UPath
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
T = TypeVar("T")


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


def location(ref: str | os.PathLike[str] | UPath) -> UPath:
    """The location ``ref`` names: a URL (``s3://b/p``, ``file:///p``) or a local path."""
    if isinstance(ref, UPath):
        return ref
    text = os.fspath(ref)
    protocol = text.split("://", 1)[0] if "://" in text else ""
    if protocol in _LOCAL_PROTOCOLS:
        local = text.split("://", 1)[1] if protocol else text
        return UPath(os.path.expanduser(local))
    return UPath(text, **storage_options(protocol))


def is_remote(loc: str | os.PathLike[str] | UPath) -> bool:
    """True for an object-store (non-local) location."""
    return location(loc).protocol not in _LOCAL_PROTOCOLS


def url(loc: str | os.PathLike[str] | UPath) -> str:
    """The string form users see: ``s3://bucket/key`` or an absolute local path."""
    loc = location(loc)
    return str(loc) if is_remote(loc) else str(Path(loc).absolute())


def absolute(loc: str | os.PathLike[str] | UPath) -> UPath:
    """``loc`` with a local path made absolute (what another process or node can open)."""
    return location(url(loc))


def relative(loc: UPath, root: UPath) -> str:
    """``loc`` relative to ``root`` (POSIX separators), for records inside a run."""
    return str(location(loc).relative_to(location(root))).replace(os.sep, "/")


def local_path(loc: str | os.PathLike[str] | UPath, what: str) -> Path:
    """The local path of ``loc``; a remote URL is refused naming ``what`` needs a local file."""
    loc = location(loc)
    if is_remote(loc):
        raise StoreError(f"{what} must be a local path, not an object-store URL", where=url(loc))
    return Path(loc)


# -- errors and retries ----------------------------------------------------------------------
_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "serviceunavailable",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "connection reset",
    "connection aborted",
    "temporarily",
    "requestlimitexceeded",
)
# an HTTP 5xx named as a status (not any "50x" inside a key or a temporary name)
_STATUS_5XX = re.compile(
    r"(?:status|http|code|error)\W{0,3}5\d\d\b|\b5\d\d (?:server|service|internal)"
)


def is_transient(error: BaseException) -> bool:
    """A network or service hiccup worth retrying (timeouts, 5xx, throttling), not bad data."""
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    status = getattr(error, "response", None)
    if isinstance(status, dict):  # botocore's ClientError
        code = status.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int) and code >= 500:
            return True
    text = f"{type(error).__name__} {error}".lower()
    return any(w in text for w in _TRANSIENT_WORDS) or _STATUS_5XX.search(text) is not None


def storage_error(error: BaseException, where: str) -> StoreError | None:
    """The one-line user error for a missing bucket, missing credentials or a denied request;
    None when ``error`` is none of these."""
    text = f"{type(error).__name__}: {error}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "bucket not found" in low:
        return StoreError("the bucket does not exist (create it, or fix the URL)", where=where)
    if "nocredentials" in low or "unable to locate credentials" in low:
        return StoreError(
            "no object-store credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, or storage.options)",
            where=where,
        )
    if (
        isinstance(error, PermissionError)
        or "invalidaccesskeyid" in low
        or "signaturedoesnotmatch" in low
        or "accessdenied" in low
        or "forbidden" in low
    ):
        return StoreError(
            f"access denied: the credentials are wrong or lack permission ({_short(text)})",
            where=where,
        )
    return None


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 1] + "…"


def retrying(fn: Callable[[], T], where: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run ``fn``, retrying transient errors with exponential backoff; storage errors become
    one-line :class:`StoreError` naming ``where``."""
    for attempt in range(attempts):
        try:
            return fn()
        except StoreError:
            raise
        except Exception as e:
            known = storage_error(e, where)
            if known is not None:
                raise known from e
            if not is_transient(e) or attempt == attempts - 1:
                if is_transient(e):
                    raise StoreError(
                        f"storage unavailable after {attempts} attempts ({_short(str(e))})",
                        where=where,
                    ) from e
                raise
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def storage_errors(where: str | os.PathLike[str] | UPath) -> Iterator[None]:
    """Context turning missing-bucket / credential / permission errors into a :class:`StoreError`."""
    text = where if isinstance(where, str) else url(where)
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        known = storage_error(e, text)
        if known is not None:
            raise known from e
        raise


# -- files -----------------------------------------------------------------------------------
def exists(loc: UPath) -> bool:
    """Whether ``loc`` exists (a file, or a folder holding anything).

    On an object store a missing bucket or a denied request is an error, not ``False`` (fsspec's
    own ``exists`` answers ``False`` to both).
    """
    loc = location(loc)
    if not is_remote(loc):
        return loc.exists()
    where = url(loc)

    def probe() -> bool:
        fs = loc.fs
        fs.invalidate_cache(loc.path)  # another process may have written it since we listed
        try:
            fs.info(loc.path)
            return True
        except FileNotFoundError as e:
            if storage_error(e, where) is not None:
                raise
            bucket = loc.path.split("/", 1)[0]
            if bucket != loc.path:
                try:
                    fs.info(bucket)
                except FileNotFoundError:
                    raise StoreError(
                        "the bucket does not exist (create it, or fix the URL)", where=where
                    ) from None
            return False

    return retrying(probe, where)


def makedirs(loc: UPath) -> None:
    """Create folder ``loc`` and its parents (a no-op on object stores: prefixes need none)."""
    loc = location(loc)
    if not is_remote(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


def read_bytes(loc: UPath) -> bytes:
    """The whole content of file ``loc``."""
    return retrying(lambda: location(loc).read_bytes(), url(loc))


def read_text(loc: UPath) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc: UPath) -> Any:
    """Parse file ``loc`` as JSON (``ValueError`` when it is not)."""
    return json.loads(read_text(loc))


def write_bytes_atomic(loc: UPath, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see the old content or the new, never a part."""
    loc = location(loc)
    if is_remote(loc):
        # a single PUT is atomic on object stores: the object appears only when complete
        retrying(lambda: loc.write_bytes(data), url(loc))
        return
    path = Path(loc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(loc: UPath, text: str) -> None:
    write_bytes_atomic(loc, text.encode("utf-8"))


def write_json_atomic(loc: UPath, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN and infinity refused), atomically."""
    write_text_atomic(loc, json.dumps(data, indent=2, allow_nan=False) + "\n")


def append_text(loc: UPath, text: str) -> None:
    """Append to a local file; on an object store rewrite the object (logs are small)."""
    loc = location(loc)
    if not is_remote(loc):
        Path(loc).parent.mkdir(parents=True, exist_ok=True)
        with Path(loc).open("a", encoding="utf-8") as f:
            f.write(text)
        return
    old = read_text(loc) if exists(loc) else ""
    write_text_atomic(loc, old + text)


def listdir(loc: UPath) -> list[UPath]:
    """The entries directly inside folder ``loc`` (empty when it does not exist), sorted."""
    loc = location(loc)
    if is_remote(loc):
        loc.fs.invalidate_cache(loc.path)  # see other processes' new objects
    try:
        return sorted(retrying(lambda: list(loc.iterdir()), url(loc)), key=str)
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(loc: UPath) -> None:
    """Delete file or folder ``loc`` with everything in it; a no-op when absent."""
    loc = location(loc)
    if is_remote(loc):
        fs = loc.fs
        with contextlib.suppress(FileNotFoundError):
            retrying(lambda: fs.rm(loc.path, recursive=True), url(loc))
        return
    path = Path(loc)
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_tree(src: UPath, dst: UPath, last: tuple[str, ...] = ()) -> None:
    """Copy every file under folder ``src`` to ``dst`` (between any two locations), the names in
    ``last`` (relative paths, e.g. a commit marker) after all the others."""
    src, dst = location(src), location(dst)
    if not is_remote(src) and not is_remote(dst):
        files = sorted(p for p in Path(src).rglob("*") if p.is_file())
        rels = [p.relative_to(Path(src)).as_posix() for p in files]
    else:
        fs = src.fs
        prefix = src.path.rstrip("/") + "/"
        rels = [f[len(prefix) :] for f in sorted(retrying(lambda: fs.find(src.path), url(src)))]
    same_store = is_remote(src) and is_remote(dst) and src.protocol == dst.protocol
    for rel in sorted(rels, key=lambda r: (r in last, r)):
        if same_store:
            # a server-side copy: the bytes do not travel through this process
            target = f"{dst.path.rstrip('/')}/{rel}"
            retrying(
                lambda rel=rel, target=target: src.fs.copy(f"{src.path}/{rel}", target), url(dst)
            )
        else:
            write_bytes_atomic(dst / rel, read_bytes(src / rel))


def rename_or_copy(src: UPath, dst: UPath, last: tuple[str, ...] = ()) -> None:
    """Move folder ``src`` to ``dst``: a rename on a local disk; on an object store a server-side
    copy of every object (the names in ``last``, e.g. a commit marker, copied after all others),
    then deletion of ``src``. ``dst`` must not exist."""
    src, dst = location(src), location(dst)
    if not is_remote(src):
        Path(src).rename(Path(dst))
        return
    copy_tree(src, dst, last)
    remove(src)


def temporary_sibling(dest: UPath, tag: str = "tmp") -> UPath:
    """A hidden, unique location next to ``dest`` (same filesystem/bucket)."""
    dest = location(dest)
    return dest.parent / f".{dest.name}.{tag}-{uuid.uuid4().hex[:8]}"


# -- clients of other libraries --------------------------------------------------------------
def zarr_store(loc: UPath, read_only: bool = True) -> Any:
    """A zarr store for ``loc``: a ``LocalStore`` path or zarr's own ``FsspecStore``."""
    loc = location(loc)
    if not is_remote(loc):
        return str(Path(loc))
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(
        str(loc), storage_options=storage_options(loc.protocol), read_only=read_only
    )


def pyarrow_filesystem(loc: UPath) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem or None, path)`` for Ray Train/Tune's ``storage_path``.

    Local paths give ``(None, absolute path)``. A remote URL gives pyarrow's own filesystem for
    it (which reads ``AWS_ENDPOINT_URL`` and the credentials itself) wrapped around fsspec's when
    fsspec options are configured, so Ray and stkd-dist reach the same endpoint.
    """
    loc = location(loc)
    if not is_remote(loc):
        return None, str(Path(loc).absolute())
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
