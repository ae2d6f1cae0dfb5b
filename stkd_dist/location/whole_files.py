"""A local filesystem for Ray whose written files appear whole or not at all.

Ray Train and Tune keep their state in a storage root through ``pyarrow.fs``. On a local
root, pyarrow's own ``LocalFileSystem`` truncates a file when it opens it for writing and then
fills it, so a process killed in between leaves a file cut short where the previous, complete
one was. Tune's driver re-uploads every file of its experiment (its state, the searcher's
state, each trial's ``progress.csv``) at every save: a driver killed during one such copy
leaves an experiment that cannot be restored, or a trial whose log is empty. Object stores do
not have the problem (an object is put whole).

:func:`whole_file_filesystem` gives Ray the same local root through fsspec's
``LocalFileSystem``, except that a written file goes to a hidden ``.<name>.<random>.partial``
next to it and replaces the file only once it is closed (``os.replace``: atomic on POSIX within
one filesystem). A kill leaves the previous file intact and, at worst, a ``.partial`` file that
neither Ray nor stkd-dist reads; a failed write (a full disk) leaves the previous file and no
``.partial``.
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem

#: the suffix of a file being written (hidden, and matched by none of Ray's file patterns)
PARTIAL_SUFFIX = ".partial"


class _ReplaceOnClose(io.FileIO):
    """A file written under a hidden name that replaces ``path`` once it is closed."""

    def __init__(self, path: str) -> None:
        self.final = path
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        partial = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
        # O_EXCL: the name is new; the mode is the usual 0o666 less the umask
        super().__init__(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self.partial = partial
        self.failed = False

    def write(self, data: Any) -> int:
        """Write all of ``data`` (a raw write may write less) or mark the file failed."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += super().write(view[done:]) or 0
        except BaseException:
            self.failed = True  # a file short of some bytes is never published
            raise
        return done

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.failed:
            os.unlink(self.partial)  # the previous file, if any, stays as it was
            return
        # atomic against a killed process (not a power cut: there is no fsync, which would
        # cost every one of Tune's frequent saves a disk flush)
        os.replace(self.partial, self.final)


class WholeFileLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem, writing each file under a hidden name until it is closed.

    Only whole-file writes (``"wb"``; fsspec opens text files in binary and wraps them) change;
    appends and reads are fsspec's own.
    """

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if mode != "wb":
            return super()._open(path, mode=mode, block_size=block_size, **kwargs)
        return _ReplaceOnClose(self._strip_protocol(path))


def whole_file_filesystem() -> Any:
    """A ``pyarrow.fs.FileSystem`` over local paths whose written files appear whole."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(WholeFileLocalFileSystem(auto_mkdir=True)))
