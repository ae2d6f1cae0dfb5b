"""Which format a source is: from its extension, checked against its first bytes.

The extension and the content must agree. A file whose extension says one format and whose bytes
say another, or whose format cannot be told at all, is an error that asks for ``--format``.
"""

from __future__ import annotations

from pathlib import Path

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import FORMATS

_EXTENSIONS = {
    ".csv": "csv",
    ".txt": "csv",
    ".npy": "npy",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".zarr": "zarr",
}
# Leading bytes of the binary formats (NumPy's .npy header, zip for .npz, the HDF5 signature).
_MAGIC = (
    (b"\x93NUMPY", "npy"),
    (b"PK\x03\x04", "npz"),
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
)
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zmetadata")
_SNIFF_BYTES = 4096
_TEXT = "text"


def sniff_content(path: Path) -> str | None:
    """Format suggested by the content alone (``"text"`` for comma-less text), or None."""
    if path.is_dir():
        return "zarr" if any((path / m).exists() for m in _ZARR_MARKERS) else None
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if not head:
        return None
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the sniff boundary is still text
        if e.start < len(head) - 4:
            return None
        text = head[: e.start].decode("utf-8-sig")
    if "\0" in text:
        return None
    first = text.lstrip("\r\n").split("\n", 1)[0]
    # text with a comma in its first line is a CSV; other text is only one with a .csv name
    return "csv" if "," in first else _TEXT


def detect_format(path: Path, explicit: str | None = None) -> str:
    """The format of ``path``: ``explicit`` when given, else extension and content, which must agree.

    Raises:
        InputError: unknown format, or extension and content disagree (ambiguous).
    """
    if explicit is not None:
        assert explicit in FORMATS  # validated by IngestOptions
        return explicit
    if path.is_file() and path.stat().st_size == 0:
        raise InputError("empty file", where=str(path))
    by_ext = _EXTENSIONS.get(path.suffix.lower())
    by_content = sniff_content(path)
    if by_content == _TEXT:
        # a single-column CSV has no comma; a .csv name is enough for text
        by_content = "csv" if by_ext == "csv" else (None if by_ext is None else "text")
    known = ", ".join(FORMATS)
    if by_ext is None and by_content is None:
        raise InputError(
            f"unknown format: neither the extension {path.suffix or '(none)'!r} nor the content "
            f"says what this is; pass --format ({known})",
            where=str(path),
        )
    if by_ext is not None and by_content is not None and by_ext != by_content:
        raise InputError(
            f"ambiguous format: the extension says {by_ext} but the content looks like "
            f"{by_content}; pass --format ({known})",
            where=str(path),
        )
    if by_ext is not None and by_content is None:
        # the bytes do not look like the extension's format (e.g. a truncated or empty file)
        if by_ext == "zarr" or path.is_dir():
            raise InputError(
                "not a Zarr store (no zarr.json, .zgroup or .zarray inside)", where=str(path)
            )
        raise InputError(
            f"the extension says {by_ext} but the content does not look like {by_ext} "
            "(empty, truncated or another format); pass --format to read it anyway",
            where=str(path),
        )
    fmt = by_ext or by_content
    assert fmt is not None
    return fmt
