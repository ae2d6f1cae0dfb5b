"""The container images: install exactly as README.md says, non-root, entrypoint `stkd`."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from .conftest import REPO, normalise_install

DOCKER = REPO / "cluster" / "docker"
# base image -> the Python version it runs the package with
PYTHON_OF_BASE = {"python:3.11-slim": "3.11", "nvidia/cuda:": "3.12"}  # CUDA: Ubuntu 24.04's


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuations joined, comments dropped."""
    text = "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def installs(steps: list[tuple[str, str]]) -> list[str]:
    """The `pip install ... .` commands of the RUN steps (the package itself, from its source)."""
    found = []
    for word, args in steps:
        if word == "RUN":
            for part in args.split("&&"):
                if "pip install" in part and part.split()[-1] == ".":
                    found.append(normalise_install(part))
    return found


@pytest.fixture(params=["Dockerfile", "Dockerfile.cuda"])
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[tuple[str, str]]]:
    return request.param, instructions(DOCKER / request.param)


def test_install_step_is_the_readme_command(
    dockerfile: tuple[str, list[tuple[str, str]]], documented_installs: set[str]
) -> None:
    name, steps = dockerfile
    found = installs(steps)
    assert len(found) == 1, f"{name}: expected one install of the package, got {found}"
    assert found[0] in documented_installs, f"{name}: {found[0]!r} is not README.md's"
    cpu_torch = "download.pytorch.org/whl/cpu" in found[0]
    assert cpu_torch == (name == "Dockerfile"), "the CPU image takes CPU torch, the CUDA one not"
    # what `pip install .` needs is in the build context
    copied = " ".join(args for word, args in steps if word == "COPY")
    for needed in ("pyproject.toml", "README.md", "stkd_dist"):
        assert needed in copied, f"{name}: {needed} not copied"


def test_base_images_run_a_supported_python(
    dockerfile: tuple[str, list[tuple[str, str]]],
) -> None:
    name, steps = dockerfile
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert len(set(bases)) == 1, f"{name}: build and final stages must share the base"
    python = next(v for prefix, v in PYTHON_OF_BASE.items() if bases[0].startswith(prefix))
    assert f"{python}.0" in SpecifierSet(requires), f"{name}: Python {python} vs {requires}"
    if name == "Dockerfile":
        assert bases[0] == "python:3.11-slim"
    else:
        assert bases[0].startswith("nvidia/cuda:") and "ubuntu24.04" in bases[0]


def test_runs_as_the_non_root_user_of_the_manifests(
    dockerfile: tuple[str, list[tuple[str, str]]], overlay: tuple[str, list[dict[str, Any]]]
) -> None:
    name, steps = dockerfile
    final = final_stage(steps)
    users = [args for word, args in final if word == "USER"]
    assert users, f"{name}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be a numeric non-root uid"
    last_run = max(i for i, (word, _) in enumerate(final) if word == "RUN")
    last_user = max(i for i, (word, _) in enumerate(final) if word == "USER")
    assert last_user > last_run, f"{name}: USER must come after the last RUN"
    assert any(w == "RUN" and f"--uid {uid}" in a for w, a in final), f"{name}: user not created"
    entrypoint = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == [["stkd"]], f'{name}: ENTRYPOINT must be exec-form ["stkd"]'
    # the pods of the manifests run as this uid
    _, objects = overlay
    uids = {
        o["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    assert uids == {int(uid)}


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "storage", ".git"} <= ignored
