"""Files and folders at a location: exists, read, atomic write, list, copy, remove."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from upath import UPath

from stkd_dist.errors import StoreError
from stkd_dist.location.errors import retrying, storage_error
from stkd_dist.location.urls import PathInput, as_path, is_remote, location, url


def exists(loc: PathInput) -> bool:
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


def makedirs(loc: PathInput) -> None:
    """Create folder ``loc`` and its parents (a no-op on object stores: prefixes need none)."""
    loc = location(loc)
    if not is_remote(loc):
        as_path(loc).mkdir(parents=True, exist_ok=True)


def read_bytes(loc: PathInput) -> bytes:
    """The whole content of file ``loc``."""
    return retrying(lambda: location(loc).read_bytes(), url(loc))


def read_text(loc: PathInput) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc: PathInput) -> Any:
    """Parse file ``loc`` as JSON (``ValueError`` when it is not)."""
    return json.loads(read_text(loc))


def write_bytes_atomic(loc: PathInput, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see the old content or the new, never a part."""
    loc = location(loc)
    if is_remote(loc):
        # a single PUT is atomic on object stores: the object appears only when complete
        retrying(lambda: loc.write_bytes(data), url(loc))
        return
    path = as_path(loc)
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


def write_text_atomic(loc: PathInput, text: str) -> None:
    write_bytes_atomic(loc, text.encode("utf-8"))


def write_json_atomic(loc: PathInput, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN and infinity refused), atomically."""
    write_text_atomic(loc, json.dumps(data, indent=2, allow_nan=False) + "\n")


def append_text(loc: PathInput, text: str) -> None:
    """Append to a local file; on an object store rewrite the object (logs are small)."""
    loc = location(loc)
    if not is_remote(loc):
        as_path(loc).parent.mkdir(parents=True, exist_ok=True)
        with as_path(loc).open("a", encoding="utf-8") as f:
            f.write(text)
        return
    old = read_text(loc) if exists(loc) else ""
    write_text_atomic(loc, old + text)


def listdir(loc: PathInput) -> list[UPath]:
    """The entries directly inside folder ``loc`` (empty when it does not exist), sorted."""
    loc = location(loc)
    if is_remote(loc):
        loc.fs.invalidate_cache(loc.path)  # see other processes' new objects
    try:
        return sorted(retrying(lambda: list(loc.iterdir()), url(loc)), key=str)
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(loc: PathInput) -> None:
    """Delete file or folder ``loc`` with everything in it; a no-op when absent."""
    loc = location(loc)
    if is_remote(loc):
        fs = loc.fs
        with contextlib.suppress(FileNotFoundError):
            retrying(lambda: fs.rm(loc.path, recursive=True), url(loc))
        return
    path = as_path(loc)
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_tree(src: PathInput, dst: PathInput, last: tuple[str, ...] = ()) -> None:
    """Copy every file under folder ``src`` to ``dst`` (between any two locations), the names in
    ``last`` (relative paths, e.g. a commit marker) after all the others."""
    src, dst = location(src), location(dst)
    if not is_remote(src) and not is_remote(dst):
        files = sorted(p for p in as_path(src).rglob("*") if p.is_file())
        rels = [p.relative_to(as_path(src)).as_posix() for p in files]
    else:
        fs = src.fs
        prefix = src.path.rstrip("/") + "/"
        rels = [f[len(prefix) :] for f in sorted(retrying(lambda: fs.find(src.path), url(src)))]
    same_store = is_remote(src) and is_remote(dst) and src.protocol == dst.protocol
    for rel in sorted(rels, key=lambda r: (r in last, r)):
        if same_store:
            # a server-side copy: the bytes do not travel through this process
            target = f"{dst.path.rstrip('/')}/{rel}"
            retrying(functools.partial(src.fs.copy, f"{src.path}/{rel}", target), url(dst))
        else:
            write_bytes_atomic(dst / rel, read_bytes(src / rel))


def rename_or_copy(src: PathInput, dst: PathInput, last: tuple[str, ...] = ()) -> None:
    """Move folder ``src`` to ``dst``: a rename on a local disk; on an object store a server-side
    copy of every object (the names in ``last``, e.g. a commit marker, copied after all others),
    then deletion of ``src``. ``dst`` must not exist."""
    src, dst = location(src), location(dst)
    if not is_remote(src):
        as_path(src).rename(as_path(dst))
        return
    copy_tree(src, dst, last)
    remove(src)


def temporary_sibling(dest: PathInput, tag: str = "tmp") -> UPath:
    """A hidden, unique location next to ``dest`` (same filesystem/bucket)."""
    dest = location(dest)
    return dest.parent / f".{dest.name}.{tag}-{uuid.uuid4().hex[:8]}"
