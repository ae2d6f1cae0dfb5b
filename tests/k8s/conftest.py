"""Fixtures for the deployment artefacts: rendered kustomize overlays and README commands."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBE_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/overlays/<overlay>`` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed to render the kustomize overlays)")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """(name, rendered objects) for every overlay; each is rendered once per session."""
    name = request.param
    if name not in _RENDERED:
        _RENDERED[name] = render(name)
    return name, _RENDERED[name]


@pytest.fixture(scope="session")
def readme_code_lines() -> list[str]:
    """Lines of the fenced code blocks of README.md, comments and continuations folded."""
    text = (REPO / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].strip()
            if code and not code.startswith("#"):
                lines.append(" ".join(code.split()))
    return lines


def normalise_install(command: str) -> str:
    """A pip install command in canonical spelling: ``pip install <args>``, one space apart."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("pip") or w == "pip")
    return " ".join(["pip", *words[start + 1 :]])


@pytest.fixture(scope="session")
def documented_installs(readme_code_lines: list[str]) -> set[str]:
    """The commands README.md gives for installing the package from its source (``... .``)."""
    installs = set()
    for line in readme_code_lines:
        for part in line.split("&&"):
            if "pip install" in part and part.split()[-1] == ".":
                installs.add(normalise_install(part))
    assert installs, "README.md documents no `pip install ... .` command"
    return installs
