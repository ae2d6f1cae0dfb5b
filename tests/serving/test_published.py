"""``published.json``: what ``stkd update`` publishes, and a follower that hands each new version
over once (the loading is a stand-in; the file is real)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stkd_dist.serving.published import Follower, Published, publish_version, read_published


def test_publishing_keeps_the_earlier_versions_and_is_idempotent(tmp_path: Path) -> None:
    assert read_published(tmp_path) is None
    publish_version(tmp_path, "v1", "/c/1", "fp1")
    publish_version(tmp_path, "v2", "/c/2", "fp2")
    again = publish_version(tmp_path, "v2", "/c/2", "fp2")
    on_disk = json.loads((tmp_path / "published.json").read_text())
    assert on_disk["version"] == "v2" and on_disk["fingerprint"] == "fp2"
    assert on_disk["earlier"] == [{"version": "v1", "checkpoint": "/c/1"}]
    assert again == read_published(tmp_path)
    assert not list(tmp_path.glob(".*tmp"))  # written whole, no temporary left


def test_a_follower_loads_each_new_version_once(tmp_path: Path) -> None:
    loaded: list[str] = []
    handed: list[Any] = []

    def load(p: Published) -> Any:
        loaded.append(p.version)
        return f"teacher {p.version}"

    follower = Follower(tmp_path, load, handed.append, served="v1", interval_s=60)
    assert not follower.poll()  # nothing published yet
    publish_version(tmp_path, "v1", "/c/1", "fp1")
    assert not follower.poll()  # the version served already
    publish_version(tmp_path, "v2", "/c/2", "fp2")
    assert follower.poll() and not follower.poll()
    assert loaded == ["v2"] and handed == ["teacher v2"] and follower.served == "v2"
