"""Regenerate the Python code of the protobuf package ``stkd.v1``.

The generated modules are committed in :mod:`stkd_dist.serving.proto_gen` so that installing the
project needs no code generation. After editing a file under ``proto/`` run::

    python -m stkd_dist.serving.protogen

which runs ``grpc_tools.protoc`` with ``-I proto`` and writes ``teacher_pb2.py``,
``teacher_pb2.pyi`` and ``teacher_pb2_grpc.py`` flat into ``proto_gen/``. ``protoc`` writes the
``_grpc`` module with an absolute import (``from stkd.v1 import teacher_pb2``) that only works
with ``proto/`` on ``sys.path``; it is rewritten to a relative import. A test regenerates into a
temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GENERATED_DIR = Path(__file__).resolve().parent / "proto_gen"
# proto file (relative to PROTO_ROOT) -> base name of its generated modules
PROTO_FILES = {"stkd/v1/teacher.proto": "teacher"}


def _fix_imports(text: str) -> str:
    for proto, base in PROTO_FILES.items():
        package = proto.rsplit("/", 1)[0].replace("/", ".")
        text = text.replace(f"from {package} import {base}_pb2", f"from . import {base}_pb2")
    return text


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the modules of every file in :data:`PROTO_FILES` into ``out_dir``.

    Returns the written paths. Raises ``RuntimeError`` when ``protoc`` fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto, base in PROTO_FILES.items():
            argv = [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                proto,
            ]
            if protoc.main(argv) != 0:
                raise RuntimeError(f"protoc failed on {proto_root / proto}")
            gen = Path(tmp) / proto.rsplit("/", 1)[0]
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                src = gen / f"{base}{suffix}"
                dest = out_dir / src.name
                dest.write_text(_fix_imports(src.read_text()))
                written.append(dest)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="output folder")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    init = args.out / "__init__.py"
    if not init.exists():
        shutil.copyfile(GENERATED_DIR / "__init__.py", init)


if __name__ == "__main__":
    main()
