"""Training checkpoints: what one holds, how it is written, found and loaded.

:mod:`.files` writes, reads and verifies one checkpoint; :mod:`.experiment` finds the one to
resume from, an experiment's best, and what a checkpoint reference means.

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

from stkd_dist.checkpoint.experiment import (
    latest_checkpoint,
    list_checkpoints,
    load_forecaster,
    read_best,
    resolve_checkpoint,
    write_best,
)
from stkd_dist.checkpoint.files import (
    BEST,
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    META,
    MODEL,
    TRAIN_STATE,
    CheckpointInfo,
    DamagedCheckpointError,
    TrainState,
    file_sha256,
    load_checkpoint_state,
    make_version,
    read_checkpoint,
    save_checkpoint,
    weights_digest,
)

__all__ = [
    "BEST",
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "META",
    "MODEL",
    "TRAIN_STATE",
    "CheckpointInfo",
    "DamagedCheckpointError",
    "TrainState",
    "file_sha256",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_state",
    "load_forecaster",
    "make_version",
    "read_best",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "weights_digest",
    "write_best",
]
