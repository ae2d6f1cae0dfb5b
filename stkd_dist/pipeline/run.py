"""A pipeline run directory and its stage bookkeeping.

A run lives in ``<storage>/runs/<run>/`` (:class:`RunLayout`). After each stage of ``stkd distill``
finishes, :class:`StageBook` records it in ``stages.json`` (written atomically: temp file, then
rename) with

* ``key``: a digest of the inputs the stage depends on (the config sections it reads and the
  dataset fingerprint, see :func:`config_digest`);
* ``outputs``: the files or folders it produced, relative to the run directory.

On a re-run a stage is skipped only when its record exists, its key is unchanged and every output
is still there; a stage whose outputs were deleted, or whose config changed, is redone (and so is
every stage that depends on it: see :mod:`stkd_dist.pipeline.distill`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from stkd_dist.config import Config, to_mapping
from stkd_dist.errors import StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    absolute,
    exists,
    location,
    read_json,
    relative,
    url,
    write_json_atomic,
)
from stkd_dist.paths import run_dir

STAGES_FILE = "stages.json"
STAGES_FORMAT = 1


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps its files.

    Attributes:
        root: the run directory ``<storage>/runs/<run>`` (a local folder or an object-store
            prefix).
    """

    root: Location

    @classmethod
    def of(cls, run_name: str, storage: PathInput | None = None) -> RunLayout:
        """The layout of run ``run_name`` under the storage root (absolute paths)."""
        return cls(absolute(run_dir(run_name, storage)))

    @property
    def config(self) -> Location:
        """The resolved config (``config.yaml``)."""
        return self.root / "config.yaml"

    @property
    def stages(self) -> Location:
        return self.root / STAGES_FILE

    @property
    def metrics(self) -> Location:
        return self.root / "metrics.json"

    @property
    def history(self) -> Location:
        return self.root / "history.json"

    @property
    def forecasts(self) -> Location:
        return self.root / "forecasts.npz"

    @property
    def locations(self) -> Location:
        return self.root / "locations.npz"

    @property
    def report_md(self) -> Location:
        return self.root / "report.md"

    @property
    def report_html(self) -> Location:
        return self.root / "report.html"

    @property
    def labels(self) -> Location:
        """Folder of the run's soft-label caches."""
        return self.root / "labels"

    @property
    def logs(self) -> Location:
        """Folder of the run's logs (one file per invocation)."""
        return self.root / "logs"

    def experiment(self, name: str) -> Location:
        """A Ray experiment of the run (``teacher``, ``student_kd``, ``student_scratch``)."""
        return self.root / name

    def relative(self, path: PathInput | Location) -> str:
        """``path`` relative to the run directory (as recorded in ``stages.json``)."""
        return relative(absolute(path), self.root)


#: keys no single model's stage depends on: the number of ``distill.rounds`` and how later
#: rounds fine-tune their teachers (their own stages digest them); left out of a picked section
ROUND_KEYS = ("distill.rounds", "distill.feedback", "distill.feedback_epochs")
#: keys left out of a picked section while they hold this value (features added later: a run
#: that does not use them keeps the stage keys it had before they existed)
UNSET_KEYS = {"data.recent_days": None}


def config_digest(cfg: Config, sections: Iterable[str], **extra: Any) -> str:
    """A short digest of the dotted config ``sections`` (``"data"``, ``"run.seed"``) and ``extra``.

    Two configs with equal values in those sections give equal digests; anything else in the
    config (cluster size, run name, ...) does not change it. A whole ``distill`` section leaves
    out :data:`ROUND_KEYS` (asking for more rounds redoes no round already done); name them to
    digest them.
    """
    full = to_mapping(cfg)
    picked: dict[str, Any] = {}
    for dotted in sorted(set(sections)):
        node: Any = full
        for part in dotted.split("."):
            node = node[part]
        if isinstance(node, dict):
            inner = {k.split(".", 1)[1] for k in ROUND_KEYS if k.split(".", 1)[0] == dotted}
            unset = {
                k.split(".", 1)[1]: v for k, v in UNSET_KEYS.items() if k.split(".", 1)[0] == dotted
            }
            node = {
                k: v
                for k, v in node.items()
                if k not in inner and not (k in unset and v == unset[k])
            }
        picked[dotted] = node
    picked.update({f"extra.{k}": v for k, v in sorted(extra.items())})
    text = json.dumps(picked, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageRecord:
    """One completed stage, as ``stages.json`` holds it.

    Attributes:
        name: the stage.
        key: digest of its inputs when it ran.
        outputs: what it produced, relative to the run directory.
        seconds: how long it took.
        finished: when it finished (Unix time).
        info: stage-specific facts for later stages and the summary (e.g. the teacher version).
    """

    name: str
    key: str
    outputs: tuple[str, ...] = ()
    seconds: float = 0.0
    finished: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StageRecord:
        return cls(
            name=str(d["name"]),
            key=str(d["key"]),
            outputs=tuple(str(o) for o in d.get("outputs", ())),
            seconds=float(d.get("seconds", 0.0)),
            finished=float(d.get("finished", 0.0)),
            info=dict(d.get("info", {})),
        )


class StageBook:
    """The completed stages of a run (``stages.json``).

    Args:
        layout: the run directory.

    Raises:
        StoreError: ``stages.json`` exists but is not readable bookkeeping.
    """

    def __init__(self, layout: RunLayout) -> None:
        self.layout = layout
        self.records: dict[str, StageRecord] = {}
        path = layout.stages
        if exists(path):
            try:
                data = read_json(path)
                if data.get("format") != STAGES_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {STAGES_FORMAT}")
                self.records = {
                    name: StageRecord.from_json(rec) for name, rec in data["stages"].items()
                }
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StoreError(
                    f"unreadable stage bookkeeping ({e}); delete it to redo every stage",
                    where=url(path),
                ) from e

    def missing_outputs(self, record: StageRecord) -> list[str]:
        """The recorded outputs of ``record`` that no longer exist."""
        return [o for o in record.outputs if not exists(self.layout.root / o)]

    def completed(self, name: str, key: str) -> StageRecord | None:
        """The record of stage ``name`` if it completed with inputs ``key`` and its outputs
        all still exist; None when the stage must run (again)."""
        record = self.records.get(name)
        if record is None or record.key != key or self.missing_outputs(record):
            return None
        return record

    def why_redo(self, name: str, key: str) -> str:
        """A short reason why stage ``name`` runs: ``new``, ``config changed``, ``outputs missing``."""
        record = self.records.get(name)
        if record is None:
            return "new"
        if record.key != key:
            return "inputs changed"
        missing = self.missing_outputs(record)
        if missing:
            return f"output missing: {missing[0]}"
        return "complete"

    def record(
        self,
        name: str,
        key: str,
        outputs: Iterable[PathInput],
        seconds: float,
        info: Mapping[str, Any] | None = None,
    ) -> StageRecord:
        """Record stage ``name`` as completed and rewrite ``stages.json`` atomically.

        Outputs are given as paths (absolute, or relative to the run directory); each must exist.
        """
        rel = []
        for out in outputs:
            text = str(out)
            p = location(out) if "://" in text or os.path.isabs(text) else self.layout.root / text
            assert exists(p), f"stage {name} claims output {url(p)}, which does not exist"
            rel.append(self.layout.relative(p))
        rec = StageRecord(name, key, tuple(rel), float(seconds), time.time(), dict(info or {}))
        self.records[name] = rec
        self._save()
        return rec

    def forget(self, name: str) -> None:
        """Drop the record of stage ``name`` (it will run again)."""
        if self.records.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        write_json_atomic(
            self.layout.stages,
            {
                "format": STAGES_FORMAT,
                "stages": {n: r.to_json() for n, r in self.records.items()},
            },
        )
