"""Training checkpoints: what one holds, how it is written, found and loaded.

A checkpoint is a directory::

    model.pt        Forecaster state_dict (weights, target statistics, graph buffers)
    train_state.pt  optimiser and scheduler state (to resume training)
    meta.json       written LAST: version, epoch, model spec, resolved config, dataset
                    fingerprint, normalisation statistics, metrics, training state and the
                    size and sha256 of the two files above

Ray Train copies the directory rank 0 wrote into ``<run>/<experiment>/epoch_NNNN`` and registers it
in its ``checkpoint_manager_snapshot.json`` only after the copy finished, so Ray never resumes from
a partial copy. The copy itself is not atomic (``pyarrow.fs.copy_files``, file by file, in any
order), so a rank 0 killed while it runs leaves a torn directory behind: on a local disk files
missing or cut short (``meta.json`` included: then it is not valid JSON), on an object store, where
every object appears whole or not at all, objects missing (``meta.json`` without ``model.pt``, or
the weights without ``meta.json``). Our own readers therefore go one step further: a directory
without a readable ``meta.json``, or whose files are missing or differ from the sizes and hashes
in it, is refused (:class:`DamagedCheckpointError`), so a half-copied checkpoint is never loaded;
:func:`latest_checkpoint`, what a resumed run continues from, skips such checkpoints for the newest
one that verifies, with a warning naming both.

``resolve_checkpoint`` accepts a checkpoint directory, a run directory, an experiment directory or
a run name (meaning the run's best checkpoint, from ``best.json``).
"""

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
    listdir,
    location,
    read_bytes,
    read_json,
    relative,
    retrying,
    url,
    write_json_atomic,
)
from stkd_dist.paths import run_dir

if TYPE_CHECKING:
    from stkd_dist.models import Forecaster

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
    return _info(location(d), meta)


def _info(path: Location, meta: dict[str, Any]) -> CheckpointInfo:
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


def _read_meta(d: Location) -> dict[str, Any]:
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


def _verify_files(d: Location, meta: dict[str, Any]) -> None:
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
    meta = _read_meta(d)
    if verify:
        _verify_files(d, meta)
    return _info(d, meta)


def list_checkpoints(experiment: PathInput) -> list[CheckpointInfo]:
    """Checkpoints of an experiment directory with a readable ``meta.json``, by epoch.

    Those without one (incomplete) are skipped; the files are not verified (see
    :func:`latest_checkpoint` for the checkpoint to resume from).
    """
    out = []
    for d in listdir(location(experiment)):
        if d.name.startswith(".") or d.is_file():
            continue
        try:
            out.append(read_checkpoint(d, verify=False))
        except StoreError:
            continue
    return sorted(out, key=lambda i: i.state.order)


def latest_checkpoint(
    experiment: PathInput | Location,
) -> CheckpointInfo | None:
    """The newest checkpoint of an experiment directory that verifies: the one to resume from.

    Checkpoints are tried newest (highest epoch) first, each verified against its ``meta.json``
    (sizes, then sha256), until one verifies, so only the checkpoint used and any damaged newer
    ones are read. A checkpoint that is incomplete or damaged (:class:`DamagedCheckpointError`:
    ``meta.json`` missing or unreadable, a file missing, cut short or not matching) is skipped,
    and one warning names the skipped checkpoints, why, and the one used. None when no checkpoint
    verifies (the run starts from scratch; a warning names the damaged ones) or there are none.

    Storage that cannot be read, or a checkpoint of another format, raises :class:`StoreError`:
    an outage or a newer stkd-dist is no reason to start over.
    """
    exp = location(experiment)
    readable: list[tuple[CheckpointInfo, dict[str, Any]]] = []
    skipped: list[tuple[Location, str]] = []
    for d in listdir(exp):
        if d.name.startswith(".") or d.is_file():
            continue
        try:
            meta = _read_meta(d)
            readable.append((_info(d, meta), meta))
        except DamagedCheckpointError as e:
            # a folder holding checkpoint files (not e.g. ``workers/``) without a usable meta.json
            if {p.name for p in listdir(d)} & {META, MODEL, TRAIN_STATE}:
                skipped.append((d, e.message))
    chosen = None
    for info, meta in sorted(readable, key=lambda im: im[0].state.order, reverse=True):
        try:
            _verify_files(info.path, meta)
        except DamagedCheckpointError as e:
            skipped.append((info.path, e.message))
            continue
        chosen = info
        break
    if skipped:
        what = "; ".join(f"{url(p)} ({why})" for p, why in skipped)
        many = "s" if len(skipped) > 1 else ""
        if chosen is None:
            log.warning(
                "skipping incomplete or damaged checkpoint%s %s; no checkpoint of %s is "
                "complete, so training starts from scratch",
                many,
                what,
                url(exp),
            )
        else:
            log.warning(
                "skipping incomplete or damaged checkpoint%s %s; resuming from %s "
                "(after epoch %d) instead",
                many,
                what,
                url(chosen.path),
                chosen.epoch + 1,
            )
    return chosen


def write_best(experiment: PathInput | Location, info: CheckpointInfo, **extra: Any) -> Location:
    """Write ``<experiment>/best.json`` pointing at ``info`` (path relative to the experiment)."""
    experiment = location(experiment)
    data = {
        "checkpoint": relative(info.path, experiment),
        "val_mae": info.val_mae,
        "epoch": info.epoch,
        "version": info.version,
        "fingerprint": info.fingerprint,
        **extra,
    }
    write_json_atomic(experiment / BEST, data)
    return experiment / BEST


def read_best(experiment: PathInput) -> dict[str, Any] | None:
    """``best.json`` of an experiment directory, or None when there is none."""
    p = location(experiment) / BEST
    if not exists(p):
        return None
    try:
        return read_json(p)
    except (OSError, ValueError) as e:
        raise StoreError(f"unreadable ({e})", where=url(p)) from e


def _best_of_experiment(experiment: Location) -> Location | None:
    best = read_best(experiment)
    if best is not None:
        return experiment / best["checkpoint"]
    # an interrupted run has no best.json yet: use its best complete checkpoint
    done = [i for i in list_checkpoints(experiment) if i.val_mae is not None]
    if not done:
        return None
    return min(done, key=lambda i: (i.val_mae, -i.epoch)).path


def resolve_checkpoint(
    ref: PathInput,
    role: str = "teacher",
    storage: PathInput | None = None,
) -> Location:
    """The checkpoint directory ``ref`` means.

    ``ref`` is a checkpoint directory, an experiment directory (``runs/R/teacher``), a run directory
    (``runs/R``, meaning its ``role`` experiment) or a run name under the storage root; the last
    three mean the experiment's best checkpoint (``best.json``, else its best complete checkpoint).
    """
    path = location(ref)
    if not exists(path):
        text = str(ref)
        try:
            candidate = run_dir(text, storage)
        except StoreError:
            raise StoreError(
                "no such checkpoint (give a checkpoint directory, a run directory or a run name)",
                where=text,
            ) from None
        if not exists(candidate):
            raise StoreError(
                f"no checkpoint at {url(path)} and no run named {text!r} at {url(candidate)}",
                where=text,
            )
        path = candidate
    if exists(path / META) or exists(path / MODEL):
        return path
    for experiment in (path, path / role):
        if exists(experiment / BEST) or list_checkpoints(experiment):
            best = _best_of_experiment(experiment)
            if best is not None:
                return best
    raise StoreError(
        f"no {role} checkpoint here (expected a checkpoint directory with {META}, or a run with "
        f"{role}/{BEST}); train one with `stkd train-{role.split('_')[0]}`",
        where=url(path),
    )


def _torch_load(loc: Location, map_location: str | torch.device = "cpu") -> Any:
    # torch.load needs a seekable file: read the object whole (checkpoints are small next to RAM)
    return torch.load(io.BytesIO(read_bytes(loc)), map_location=map_location, weights_only=True)


def load_checkpoint_state(path: PathInput) -> dict[str, Any]:
    """``{"model": state_dict, "optimizer": ..., "scheduler": ..., "partial": ...,
    "loss_state": ...}`` of a checkpoint, on CPU (``partial``: None unless it was taken
    mid-epoch; ``loss_state``: None unless the loss trains parameters of its own, and absent
    from checkpoints written before it existed)."""
    d = location(path)
    return {"model": _torch_load(d / MODEL), **_torch_load(d / TRAIN_STATE)}


def load_forecaster(
    ref: PathInput,
    role: str = "teacher",
    storage: PathInput | None = None,
    *,
    device: str | torch.device = "cpu",
) -> tuple[Forecaster, CheckpointInfo]:
    """Load a checkpoint's model: ``(Forecaster in eval mode on device, CheckpointInfo)``.

    ``ref`` is anything :func:`resolve_checkpoint` accepts. The weights are loaded straight onto
    ``device`` (``map_location``), never staged on the CPU first.
    """
    from stkd_dist.models import Forecaster

    info = read_checkpoint(resolve_checkpoint(ref, role, storage))
    # the architecture is built (randomly initialised, small) on the CPU and moved before the
    # weights are copied in on the device
    model = Forecaster.from_spec(info.spec).to(device)
    state = _torch_load(info.path / MODEL, map_location=device)
    model.load_state_dict(state)
    model.eval()
    return model, info
