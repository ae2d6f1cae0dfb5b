"""Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml) and their documentation."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from .conftest import REPO, normalise_install

CONFIGS = ["aws.yaml", "gcp.yaml"]
GPU_INSTANCE_FAMILIES = ("g4", "g5", "g6", "p3", "p4", "p5")


@pytest.fixture(params=CONFIGS)
def config(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    path = REPO / "cluster" / request.param
    return request.param, yaml.safe_load(path.read_text())


def is_gpu(node_type: dict[str, Any]) -> bool:
    node_config = node_type.get("node_config", {})
    return bool(
        node_type.get("resources", {}).get("GPU")
        or node_config.get("guestAccelerators")
        or str(node_config.get("InstanceType", "")).startswith(GPU_INSTANCE_FAMILIES)
    )


def test_required_keys_and_node_types(config: tuple[str, dict[str, Any]]) -> None:
    name, cfg = config
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
    ):
        assert key in cfg, f"{name}: {key} missing"
    assert cfg["provider"]["type"] == name.removesuffix(".yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not is_gpu(head) and head["resources"]["CPU"] == 0, "the head runs no training"
    gpu_types = [t for k, t in types.items() if k != cfg["head_node_type"] and is_gpu(t)]
    assert gpu_types, f"{name}: no GPU worker type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 1
        assert t["max_workers"] <= cfg["max_workers"]


def test_setup_installs_the_package_like_the_readme(
    config: tuple[str, dict[str, Any]], documented_installs: set[str]
) -> None:
    name, cfg = config

    def installs(commands: list[str]) -> set[str]:
        return {
            normalise_install(part)
            for command in commands
            for part in command.split("&&")
            if "pip install" in part and part.split()[-1] == "."
        }

    head = installs(cfg["setup_commands"] + cfg.get("head_setup_commands", []))
    worker = installs(cfg["setup_commands"] + cfg.get("worker_setup_commands", []))
    assert head and worker
    assert head | worker <= documented_installs, f"{name}: not README.md's install command"
    assert all("whl/cpu" in c for c in head), "CPU torch on the CPU head"
    assert worker == {"pip install ."}, "torch's CUDA build on GPU workers"
    # the source being installed is the repository the launcher ships
    assert cfg["file_mounts"]["~/stkd-dist"] == "."
    assert {".venv", "storage", ".git"} <= set(cfg["rsync_exclude"])


def test_every_node_uses_the_shared_storage_and_token_auth(
    config: tuple[str, dict[str, Any]],
) -> None:
    name, cfg = config
    mounted = re.search(r"mount -t nfs\S* .* (/\S+)\)", " ".join(cfg["setup_commands"]))
    assert mounted, f"{name}: no NFS mount in setup_commands"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert f"STKD_STORAGE={mounted.group(1)}" in start, f"{name}: {key}"
        assert "RAY_AUTH_MODE=token" in start, f"{name}: {key}"
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_every_placeholder_is_documented(config: tuple[str, dict[str, Any]]) -> None:
    name, _ = config
    text = (REPO / "cluster" / name).read_text()
    placeholders = set(re.findall(r"<([A-Z][A-Z0-9_]*)>", text))
    assert placeholders, f"{name}: no placeholders? region, images and storage are site-specific"
    readme = (REPO / "cluster" / "README.md").read_text()
    rows = {m for m in re.findall(r"^\| `<([A-Z0-9_]+)>` \| (\S+) \|", readme, flags=re.M)}
    documented = {p for p, f in rows if f == name}
    assert placeholders == documented, f"{name}: undocumented {placeholders - documented}"
