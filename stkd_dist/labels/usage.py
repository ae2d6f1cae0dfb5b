"""What a distilled student's soft labels cost the teacher: ``label_use.json`` of its experiment.

Written by the driver after a student trained with started replicas (``ray:N``), read by
``distill`` for the ``labels`` entry of ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stkd_dist.labels.replicas import ReplicaCounters
from stkd_dist.location import Location, PathInput, exists, location, read_json, write_json_atomic

LABEL_USE_FILE = "label_use.json"


@dataclass(frozen=True)
class LabelUse:
    """What the soft labels of a distilled student cost the teacher (``label_use.json``).

    Attributes:
        teacher_windows_computed: windows the teacher ran on for this student's labels: the
            forward count of the write-through label cache (every replica, every invocation);
            for replicas without a cache, what they computed in this invocation.
        distinct_windows: distinct windows the student trains on (one epoch's worth).
        cache: the label cache the replicas wrote through to (None = none).
        replicas: each replica's counters in the last invocation.
        replicas_timeline: the autoscaler's decisions in the last invocation
            (:meth:`ScaleDecision.to_json <stkd_dist.labels.autoscale.ScaleDecision.to_json>`;
            empty for a fixed fleet).
    """

    teacher_windows_computed: int
    distinct_windows: int
    cache: str | None = None
    replicas: tuple[ReplicaCounters, ...] = ()
    replicas_timeline: tuple[dict[str, Any], ...] = ()


def write_label_use(experiment: PathInput | Location, use: LabelUse) -> None:
    """Write ``label_use.json`` into ``experiment`` (atomically)."""
    write_json_atomic(location(experiment) / LABEL_USE_FILE, dataclasses.asdict(use))


def label_use(experiment: PathInput | Location) -> LabelUse | None:
    """``label_use.json`` of a distilled student's experiment (None when absent)."""
    path = location(experiment) / LABEL_USE_FILE
    if not exists(path):
        return None
    raw = read_json(path)
    replicas = tuple(ReplicaCounters(**r) for r in raw.pop("replicas", []))
    timeline = tuple(raw.pop("replicas_timeline", []))
    return LabelUse(**raw, replicas=replicas, replicas_timeline=timeline)
