"""``bench/RESULTS.md``: each benchmark owns one ``## `` section and rewrites only that one."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section titled ``heading`` of ``path`` with ``text``.

    ``text`` starts with the heading line itself. The file is rewritten under a temporary name and
    renamed, so a reader never sees it half-written.
    """
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + rest if rest else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def publish(heading: str, text: str, write: bool = True, path: Path = RESULTS) -> None:
    """Print a benchmark's section and, with ``write``, replace it in ``path``."""
    print(text)
    if write:
        write_section(heading, text, path)
        print(f"wrote the section {heading!r} of {path}", file=sys.stderr)
