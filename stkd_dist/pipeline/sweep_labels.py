"""Where a sweep's trials get their soft labels (``sweep.labels``), and what the teacher spent.

* ``stream``: :func:`trial_labels` starts ``sweep.label_replicas`` teacher replicas (default 1)
  for the length of the trials (:func:`~stkd_dist.labels.started.started_replicas`, private by default: a
  generated token, CA and per-replica certificates). Every replica writes what it computes
  through to the run's label cache ``<run>/labels/<teacher version>.zarr`` before sending it and
  serves cached windows from there, and one replica's batcher joins the requests of concurrent
  streams for the same windows: the trials, on whatever node, stream over gRPC and need no
  shared filesystem, and (with one replica) the teacher computes each distinct window once.
* ``cache``: the ``labels`` stage filled the cache before the trials (see
  :class:`~stkd_dist.pipeline.graph.StageGraph`); the trials read it.

Either way the cache's ``forward_windows`` (recorded by whoever filled it) is what the teacher
cost; the replicas' own counters say what this sweep's replicas computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stkd_dist.config import Config
from stkd_dist.data.reader import WindowReader
from stkd_dist.labels.replicas import ReplicaCounters
from stkd_dist.labels.started import replica_plan, started_replicas
from stkd_dist.labels.teachers import TeacherSpec, resolve_teachers
from stkd_dist.location import Location, PathInput, absolute, exists, url
from stkd_dist.pipeline.graph import LabelStage, ModelStage
from stkd_dist.pipeline.run import RunLayout
from stkd_dist.pipeline.stages import label_cache_path
from stkd_dist.serving.auth import resolve_token
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientOptions


@dataclass
class TrialLabels:
    """The trials' teacher and the cache behind it.

    Attributes:
        mode: ``stream`` or ``cache`` (``sweep.labels``).
        teacher: what every trial's label source reads (resolved, version pinned): the
            replicas' endpoint with their client options, or the cache.
        cache: the run's label cache of the teacher.
        replicas: filled as a ``stream`` block ends: each replica's counters.
    """

    mode: str
    teacher: TeacherSpec
    cache: Location
    replicas: list[ReplicaCounters] = field(default_factory=list)

    def summary(self, distinct_windows: int, label_reads: int) -> dict[str, Any]:
        """The ``labels`` entry of ``summary.json``."""
        forward = LabelCache(self.cache).forward_windows if exists(self.cache) else 0
        out: dict[str, Any] = {
            "mode": self.mode,
            "cache": url(self.cache),
            "distinct_windows": distinct_windows,
            # recorded in the cache by whoever filled it: what the teacher cost, once for all
            "teacher_windows_computed": forward,
            # labelled windows the trials consumed (every epoch of every trial)
            "trial_label_reads": label_reads,
        }
        if self.mode == "stream":
            out["replicas"] = len(self.replicas)
            # counted by the replicas' teacher models: what this sweep's replicas computed
            out["replica_forward_windows"] = sum(c.forward_windows for c in self.replicas)
            out["replica_streams_served"] = sum(c.streams_served for c in self.replicas)
        return out


def _window_args(reader: WindowReader) -> dict[str, Any]:
    dims = reader.dims
    return {
        "fingerprint": reader.store.fingerprint,
        "window_shape": (dims.horizon, dims.nodes, dims.out_channels),
        "windows": reader.windows("train"),
    }


@contextlib.contextmanager
def trial_labels(
    cfg: Config,
    layout: RunLayout,
    teacher: ModelStage,
    dataset: PathInput,
    reader: WindowReader,
    cache: LabelStage | None,
    storage: PathInput | None = None,
) -> Iterator[TrialLabels]:
    """The trials' label source for the block (Ray initialised): see the module docstring.

    Args:
        cfg: the sweep's config (``sweep.label_replicas`` replicas, served, computed and
            secured as the ``serve`` section says).
        layout: the run.
        teacher: the teacher the trials distil.
        dataset: the teacher's dataset (store path).
        reader: the students' windows (the teacher is checked against them).
        cache: the ``labels`` stage's cache (``sweep.labels: cache``), None to stream.
        storage: the storage root.

    """
    spread = cfg.distill.confidence_weighting
    if cache is not None:
        path = absolute(cache.location(layout))
        (resolved,) = resolve_teachers(
            [TeacherSpec("cache", url(path), val_mae=teacher.val_mae)],
            spread=spread,
            **_window_args(reader),
        )
        yield TrialLabels("cache", resolved, path)
        return
    dest = absolute(label_cache_path(layout, teacher.version))
    # resolved here: the trials' workers on other nodes do not see this process's environment
    client = ClientOptions(token=resolve_token(None), wire_dtype=cfg.serve.wire_dtype)
    # a fixed fleet of sweep.label_replicas, spread over the nodes (the trials do not report
    # their label wait to an autoscaler)
    plan = dataclasses.replace(
        replica_plan(cfg.serve), cache=url(dest), autoscale=None, per_node=None
    )
    replicas = started_replicas(
        [TeacherSpec("replicas", replicas=cfg.sweep.label_replicas)],
        checkpoint=url(teacher.path(layout)),
        dataset=dataset,
        run_name=cfg.run_name,
        client=client,
        plan=plan,
        storage=storage,
    )
    labels: TrialLabels | None = None
    with replicas as started:
        (resolved,) = resolve_teachers(
            started.teachers, spread=spread, client=client, **_window_args(reader)
        )
        labels = TrialLabels("stream", resolved, dest)
        yield labels
    labels.replicas = list(started.counters)  # read as the block ended, before they stopped
