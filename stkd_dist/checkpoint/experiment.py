"""Finding checkpoints: the newest that verifies, an experiment's best, what a reference means.

An experiment directory (``<run>/<experiment>/``) holds one checkpoint directory per epoch (and
per mid-epoch step) and ``best.json``, written after training, naming the best by validation MAE.
:func:`latest_checkpoint` is what a resumed run continues from; :func:`resolve_checkpoint` turns a
checkpoint directory, an experiment or run directory, or a run name into one checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from stkd_dist.checkpoint.files import (
    BEST,
    META,
    MODEL,
    TRAIN_STATE,
    CheckpointInfo,
    DamagedCheckpointError,
    info_from_meta,
    read_checkpoint,
    read_meta,
    torch_load,
    verify_files,
)
from stkd_dist.errors import StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    exists,
    listdir,
    location,
    read_json,
    relative,
    url,
    write_json_atomic,
)
from stkd_dist.paths import run_dir

if TYPE_CHECKING:
    from stkd_dist.models import Forecaster

log = logging.getLogger(__name__)


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
            meta = read_meta(d)
            readable.append((info_from_meta(d, meta), meta))
        except DamagedCheckpointError as e:
            # a folder holding checkpoint files (not e.g. ``workers/``) without a usable meta.json
            if {p.name for p in listdir(d)} & {META, MODEL, TRAIN_STATE}:
                skipped.append((d, e.message))
    chosen = None
    for info, meta in sorted(readable, key=lambda im: im[0].state.order, reverse=True):
        try:
            verify_files(info.path, meta)
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
    state = torch_load(info.path / MODEL, map_location=device)
    model.load_state_dict(state)
    model.eval()
    return model, info
