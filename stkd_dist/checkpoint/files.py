"""A checkpoint directory: its records (``TrainState``, ``CheckpointInfo``), writing, reading,
verifying and loading its state (see the package docstring for the layout)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stkd_dist.config import Config, from_mapping, to_mapping
from stkd_dist.data.stats import Stats
from stkd_dist.errors import StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    as_path,
    exists,
    location,
    read_bytes,
    read_json,
    retrying,
    url,
    write_json_atomic,
)

if TYPE_CHECKING:
    pass

CHECKPOINT_FORMAT = 1
META = "meta.json"
MODEL = "model.pt"
TRAIN_STATE = "train_state.pt"
BEST = "best.json"
CONFIG_FILE = "config.yaml"

log = logging.getLogger(__name__)


class DamagedCheckpointError(StoreError):
    """A checkpoint that is incomplete (interrupted while written or copied) or damaged: its
    ``meta.json`` is missing or unreadable, or a file is missing or differs from the size and
    sha256 recorded in it.

    Storage that cannot be read (a missing bucket, denied access, an unavailable service) raises a
    plain :class:`StoreError` instead: it says nothing about the checkpoint.
    """


@dataclass
class TrainState:
    """Progress of a training run, saved with every checkpoint to resume from.

    Attributes:
        epoch: the last completed epoch (0-based; -1 before the first).
        best_val_mae: the best validation MAE so far (inf before the first).
        best_epoch: the epoch that reached it.
        bad_epochs: consecutive epochs without improvement (for early stopping).
        stopped_early: training stopped before ``epochs`` because of early stopping.
        attempt: how many times the run (re)started from a checkpoint (0 = never).
        samples: training windows seen so far (all ranks).
        step: optimiser steps done in the epoch after ``epoch`` (0 = a checkpoint at an epoch's
            end; > 0 = a mid-epoch checkpoint, whose epoch resumes at this batch), counted in
            the epoch's latest deal.
        regroups: ``(world_size, steps)`` of the epoch's earlier deals when elastic training
            re-dealt it to another world size (:mod:`stkd_dist.data.regroup`); empty otherwise.
    """

    epoch: int = -1
    best_val_mae: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    attempt: int = 0
    samples: int = 0
    step: int = 0
    regroups: tuple[tuple[int, int], ...] = ()

    def end_epoch(self, epoch: int, val_mae: float, samples: int, patience: int) -> float:
        """Record a finished epoch; returns its validation MAE (inf when it was not finite).

        ``patience`` epochs in a row without a better validation MAE stop the run early
        (0: never). Under DDP every rank passes the same all-reduced MAE, so every rank makes
        the same decision and all leave the epoch loop together.
        """
        val_mae = val_mae if math.isfinite(val_mae) else float("inf")
        if val_mae < self.best_val_mae:
            self.best_val_mae, self.best_epoch, self.bad_epochs = val_mae, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = bool(patience and self.bad_epochs >= patience)
        self.epoch = epoch
        self.samples += samples
        self.step = 0
        self.regroups = ()
        return val_mae

    @property
    def steps_before(self) -> int:
        """Steps the epoch's earlier deals ran (0 unless it was re-dealt)."""
        return sum(steps for _, steps in self.regroups)

    @property
    def epoch_step(self) -> int:
        """Steps done in the epoch in progress, over all its deals."""
        return self.steps_before + self.step

    @property
    def order(self) -> tuple[int, int]:
        """``(epoch, steps into the next)``: sorts checkpoints in the order they were taken."""
        return (self.epoch, self.epoch_step)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_val_mae"] = None if d["best_val_mae"] == float("inf") else d["best_val_mae"]
        d["regroups"] = [list(g) for g in self.regroups]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        if d.get("best_val_mae") is None:
            d["best_val_mae"] = float("inf")
        d["regroups"] = tuple((int(w), int(s)) for w, s in d.get("regroups", ()))
        return cls(**d)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's ``meta.json`` says.

    Attributes:
        path: the checkpoint directory (a local path or an object-store URL).
        version: ``<run>-e<epoch>-<8 hex of the weights' sha256>``.
        epoch: the epoch it was taken after (0-based).
        spec: the model spec (``Forecaster.from_spec``).
        config: the resolved run config.
        fingerprint: the dataset fingerprint it was trained on.
        stats: the normalisation statistics of the training split.
        metrics: metrics of that epoch (``train_loss``, ``val_mae``, ...).
        role: the experiment it belongs to (``teacher``, ``student_kd``, ...).
        dataset: the dataset name.
        state: the training state (best epoch, early stopping, ...).
    """

    path: Location
    version: str
    epoch: int
    spec: dict[str, Any]
    config: Config
    fingerprint: str
    stats: Stats
    metrics: dict[str, Any] = field(default_factory=dict)
    role: str = "teacher"
    dataset: str = ""
    state: TrainState = field(default_factory=TrainState)

    @property
    def val_mae(self) -> float | None:
        """The validation MAE of the epoch (None for a mid-epoch checkpoint)."""
        v = self.metrics.get("val_mae")
        return None if v is None else float(v)

    @property
    def mid_epoch(self) -> bool:
        """Taken inside an epoch (``checkpoint.every_steps`` / ``every_minutes``)."""
        return self.state.epoch_step > 0


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and tensor bytes (same weights -> same digest)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: PathInput | Location) -> str:
    return hashlib.sha256(read_bytes(location(path))).hexdigest()


def make_version(run: str, epoch: int, digest: str, step: int = 0) -> str:
    """The version string of a checkpoint: ``<run>-e<epoch>-<digest[:8]>`` (``-e<epoch>s<step>``
    for a mid-epoch one)."""
    at = f"e{epoch}" if not step else f"e{epoch}s{step}"
    return f"{run}-{at}-{digest[:8]}"


def save_checkpoint(
    directory: PathInput,
    *,
    model_state: dict[str, torch.Tensor],
    spec: dict[str, Any],
    config: Config,
    fingerprint: str,
    stats: Stats,
    metrics: dict[str, Any],
    state: TrainState,
    role: str = "teacher",
    dataset: str = "",
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    partial: list[dict[str, Any]] | None = None,
    loss_state: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write a checkpoint into local ``directory`` (created if needed); ``meta.json`` comes last.

    Ray Train uploads the directory to the run's storage (a local root or an object store); this
    function writes only to the local disk (a scratch folder).

    Args:
        model_state: the Forecaster's ``state_dict`` (unwrapped from DDP).
        spec: ``Forecaster.spec()``.
        config: the resolved run config.
        fingerprint: the dataset fingerprint.
        stats: normalisation statistics of the training split.
        metrics: metrics of the epoch (must be JSON-serialisable and finite).
        state: training state after the epoch (``state.epoch`` is the checkpoint's epoch).
        role: experiment name (``teacher``, ``student_kd``, ...).
        dataset: dataset name, for messages.
        optimizer_state, scheduler_state: to resume training (omitted for an export).
        partial: a mid-epoch checkpoint's per-rank sums of the epoch so far (entry ``r`` is
            rank ``r``'s), so the resumed epoch reports the same metrics.
        loss_state: parameters the loss trains with the model (the hint projection), kept with
            the optimiser's state for resuming; never part of the model (``model.pt``).
    """
    d = as_path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, d / MODEL)
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "partial": partial,
            "loss_state": loss_state,
        },
        d / TRAIN_STATE,
    )
    digest = weights_digest(model_state)
    version = make_version(config.run_name, state.epoch, digest, state.epoch_step)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "role": role,
        "version": version,
        "epoch": state.epoch,
        "run": config.run_name,
        "dataset": dataset,
        "fingerprint": fingerprint,
        "weights_sha256": digest,
        "spec": spec,
        "metrics": metrics,
        "state": state.to_json(),
        "stats": stats.to_json(),
        "config": to_mapping(config),
        "files": {name: file_sha256(d / name) for name in (MODEL, TRAIN_STATE)},
        "sizes": {name: (d / name).stat().st_size for name in (MODEL, TRAIN_STATE)},
    }
    # meta.json is the completion marker: written last, atomically
    write_json_atomic(d / META, meta)
    return info_from_meta(location(d), meta)


def info_from_meta(path: Location, meta: dict[str, Any]) -> CheckpointInfo:
    where = url(path / META)
    try:
        return CheckpointInfo(
            path=path,
            version=str(meta["version"]),
            epoch=int(meta["epoch"]),
            spec=dict(meta["spec"]),
            config=from_mapping(Config, meta["config"], source=where),
            fingerprint=str(meta["fingerprint"]),
            stats=Stats.from_json(meta["stats"]),
            metrics=dict(meta.get("metrics", {})),
            role=str(meta.get("role", "teacher")),
            dataset=str(meta.get("dataset", "")),
            state=TrainState.from_json(meta.get("state", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpointError(f"malformed checkpoint metadata ({e!r})", where=where) from e


def read_meta(d: Location) -> dict[str, Any]:
    """``meta.json`` of checkpoint directory ``d``: :class:`DamagedCheckpointError` when it is
    missing or not a checkpoint's JSON object, :class:`StoreError` when it is of another format."""
    meta_path = d / META
    if not exists(meta_path):
        if not exists(d):
            raise StoreError("no such checkpoint directory", where=url(d))
        raise DamagedCheckpointError(
            f"incomplete checkpoint: {META} is missing (it is written last, so the checkpoint "
            "was interrupted while being written); use another checkpoint",
            where=url(d),
        )
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(
            f"unreadable checkpoint metadata ({e})", where=url(meta_path)
        ) from e
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(
            "unreadable checkpoint metadata (not a JSON object)", where=url(meta_path)
        )
    if meta.get("format") != CHECKPOINT_FORMAT:
        # not damage: written by another version, so never skipped for an older checkpoint
        raise StoreError(
            f"checkpoint format {meta.get('format')!r}, this version reads {CHECKPOINT_FORMAT}",
            where=url(meta_path),
        )
    if not isinstance(meta.get("files", {}), dict) or not isinstance(meta.get("sizes", {}), dict):
        raise DamagedCheckpointError(
            "malformed checkpoint metadata (files, sizes)", where=url(meta_path)
        )
    return meta


def verify_files(d: Location, meta: dict[str, Any]) -> None:
    """Check the files of checkpoint ``d`` against the sizes and sha256 ``meta`` records.

    The size (one stat) is compared first, so a file cut short is refused without reading it;
    checkpoints written before sizes were recorded are checked by their sha256 alone.
    """
    sizes = meta.get("sizes", {})
    for name, sha in meta.get("files", {}).items():
        f = d / name
        damaged = "the checkpoint is incomplete or damaged"
        if not exists(f):
            raise DamagedCheckpointError(f"{name} is missing: {damaged}", where=url(d))
        recorded = sizes.get(name)
        if recorded is not None:
            size = retrying(f.stat, url(f)).st_size
            if size != recorded:
                raise DamagedCheckpointError(
                    f"{name} has {size} bytes, {recorded} were recorded: {damaged}",
                    where=url(d),
                )
        if file_sha256(f) != sha:
            raise DamagedCheckpointError(
                f"{name} does not match its recorded sha256: {damaged}", where=url(d)
            )


def read_checkpoint(path: PathInput, verify: bool = True) -> CheckpointInfo:
    """Read and check a checkpoint directory's ``meta.json``.

    Raises :class:`DamagedCheckpointError` when ``meta.json`` is missing (an incomplete
    checkpoint) or unreadable, or (with ``verify``) a file is missing or its size or sha256
    differs from the one recorded; :class:`StoreError` when there is no such directory, the
    checkpoint is of another format or the storage cannot be read.
    """
    d = location(path)
    meta = read_meta(d)
    if verify:
        verify_files(d, meta)
    return info_from_meta(d, meta)


def torch_load(loc: Location, map_location: str | torch.device = "cpu") -> Any:
    # torch.load needs a seekable file: read the object whole (checkpoints are small next to RAM)
    return torch.load(io.BytesIO(read_bytes(loc)), map_location=map_location, weights_only=True)


def load_checkpoint_state(path: PathInput) -> dict[str, Any]:
    """``{"model": state_dict, "optimizer": ..., "scheduler": ..., "partial": ...,
    "loss_state": ...}`` of a checkpoint, on CPU (``partial``: None unless it was taken
    mid-epoch; ``loss_state``: None unless the loss trains parameters of its own, and absent
    from checkpoints written before it existed)."""
    d = location(path)
    return {"model": torch_load(d / MODEL), **torch_load(d / TRAIN_STATE)}
