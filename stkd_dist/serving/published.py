"""Published teacher versions of a run, and servers that follow them (``stkd serve --follow``).

``stkd update`` fine-tunes a run's teacher on the data now in its store and *publishes* the new
version: ``<run>/published.json`` names the version, its checkpoint and the dataset fingerprint
it was trained on, with the versions published before it. The file is written whole (one atomic
PUT or rename), so a reader sees the previous version or the new one, never half of one.

A :class:`Follower` polls that file from a running server and publishes each new version to it
(:meth:`TeacherServer.publish <stkd_dist.serving.server.TeacherServer.publish>`): new streams of
the grown store get the new teacher, streams in progress finish on the one they started on.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from stkd_dist.errors import StkdError
from stkd_dist.location import Location, PathInput, exists, location, read_json, write_json_atomic
from stkd_dist.serving.metrics import log_event
from stkd_dist.serving.teacher import Teacher

log = logging.getLogger(__name__)

#: in a run directory: the teacher version its servers should serve
PUBLISHED = "published.json"


@dataclass(frozen=True)
class Published:
    """A published teacher version.

    Attributes:
        version: the teacher version.
        checkpoint: its checkpoint (a URL or absolute path).
        fingerprint: the fingerprint of the store it was trained on.
        published_at: when (UTC, ISO 8601).
        earlier: the versions published before it, oldest first (``version`` and ``checkpoint``).
    """

    version: str
    checkpoint: str
    fingerprint: str
    published_at: str = ""
    earlier: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Published:
        return cls(
            version=str(d["version"]),
            checkpoint=str(d["checkpoint"]),
            fingerprint=str(d["fingerprint"]),
            published_at=str(d.get("published_at", "")),
            earlier=tuple(dict(e) for e in d.get("earlier", ())),
        )


def published_path(run: PathInput) -> Location:
    """``<run>/published.json``."""
    return location(run) / PUBLISHED


def read_published(run: PathInput) -> Published | None:
    """The run's published version (None when nothing was published)."""
    path = published_path(run)
    if not exists(path):
        return None
    return Published.from_json(read_json(path))


def publish_version(run: PathInput, version: str, checkpoint: str, fingerprint: str) -> Published:
    """Publish ``version`` (its ``checkpoint``, trained on ``fingerprint``) for the run's servers;
    the version published before moves to ``earlier``. Publishing the current one again is a
    no-op."""
    before = read_published(run)
    if before is not None and before.version == version:
        return before
    earlier = (
        ()
        if before is None
        else (*before.earlier, {"version": before.version, "checkpoint": before.checkpoint})
    )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = Published(version, checkpoint, fingerprint, now, earlier)
    write_json_atomic(published_path(run), asdict(record))
    return record


class Follower:
    """Polls a run's ``published.json`` and hands each new version to ``on_new``.

    Args:
        run: the run directory.
        load: loads a published version's teacher (on the store as it is now).
        on_new: called with each newly published version's teacher (e.g. ``server.publish``).
        served: the version served already (not loaded again).
        interval_s: seconds between polls.
    """

    def __init__(
        self,
        run: PathInput,
        load: Callable[[Published], Teacher],
        on_new: Callable[[Teacher], None],
        served: str,
        interval_s: float = 10.0,
    ) -> None:
        self.run = location(run)
        self.load = load
        self.on_new = on_new
        self.served = served
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stkd-follow", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def poll(self) -> bool:
        """Check once; True when a new version was loaded and handed over."""
        published = read_published(self.run)
        if published is None or published.version == self.served:
            return False
        log_event(log, "follow_load", teacher=published.version, checkpoint=published.checkpoint)
        teacher = self.load(published)
        self.on_new(teacher)
        self.served = published.version
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except (StkdError, OSError) as e:
                # a version that cannot be loaded now (store mid-append, storage hiccup) is
                # tried again at the next poll; the server keeps serving what it has
                log_event(log, "follow_error", level=logging.WARNING, error=str(e))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
