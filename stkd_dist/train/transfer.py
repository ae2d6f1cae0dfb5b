"""A teacher trained on one network, made a teacher of another (transfer).

A transferable teacher (no parameter depends on the node count, e.g. ``stgnn_inductive``) is
written as a checkpoint of the *target* dataset: the source's trained weights with the target's
adjacency, the target's target statistics and the target's fingerprint. Everything that serves
or reads labels (``stkd serve``, the label cache, students) then takes it for a teacher of the
target, and the fingerprint rule still holds: a server only serves the dataset its checkpoint
names, so the source checkpoint itself is refused for the target's windows.

Normalisation: the target's windows are normalised with the target's own training statistics
(per node when the teacher's config says ``data.per_node_stats``), and the forecasts are
de-normalised with them: the teacher sees inputs on the scale it was trained on, whatever the
target's units. Channels are matched by name; the window (``L``, ``H``) is the teacher's.
"""

from __future__ import annotations

import dataclasses

from stkd_dist.checkpoint import (
    CONFIG_FILE,
    META,
    CheckpointInfo,
    load_forecaster,
    read_checkpoint,
    save_checkpoint,
)
from stkd_dist.config import write_config
from stkd_dist.errors import ConfigError
from stkd_dist.location import (
    Location,
    PathInput,
    copy_tree,
    location,
    remove,
    scratch_dir,
    temporary_sibling,
    url,
)
from stkd_dist.storage import DatasetStore, open_store
from stkd_dist.train.loop import build_reader


def transfer_teacher(
    source: PathInput,
    target: DatasetStore,
    dest: PathInput | Location,
    storage: PathInput | None = None,
) -> CheckpointInfo:
    """Write ``source``'s teacher as a teacher of ``target`` into the checkpoint folder ``dest``.

    Args:
        source: the trained teacher (anything ``resolve_checkpoint`` accepts).
        target: the dataset whose windows it will label.
        dest: the checkpoint folder to write (local or object store; replaced when present).
        storage: storage root override (to resolve ``source``).

    Raises:
        ConfigError: the teacher is not transferable (``teacher.model``), or the target lacks a
            channel the teacher reads or forecasts (``data.input_channels`` /
            ``data.target_channels``, naming the channels that differ).
    """
    model, info = load_forecaster(source, role="teacher", storage=storage)
    data = info.config.data
    # the channels the teacher reads and forecasts, by name (None in its config: all of its
    # dataset's, so that store names them)
    every: list[str] = []
    if data.input_channels is None or data.target_channels is None:
        every = open_store(data.dataset, storage).channels
    inputs = list(data.input_channels or every)
    targets = list(data.target_channels or every)
    missing = [c for c in dict.fromkeys(inputs + targets) if c not in target.channels]
    if missing:
        raise ConfigError(
            f"the target {target.name!r} has no channel {', '.join(missing)} (it has "
            f"{', '.join(target.channels)}): the teacher reads {', '.join(inputs)} and forecasts "
            f"{', '.join(targets)}, matched by name",
            where="data.input_channels",
        )
    cfg = dataclasses.replace(
        info.config,
        data=dataclasses.replace(
            data,
            dataset=url(target.path),
            input_channels=tuple(inputs),
            target_channels=tuple(targets),
        ),
    )
    reader = build_reader(cfg, target)
    on_target = model.rebound(target.nodes, target.adjacency(), reader.target_scale())
    dest = location(dest)
    scratch = scratch_dir("transfer")
    tmp = temporary_sibling(dest)
    try:
        save_checkpoint(
            scratch / "checkpoint",
            model_state=on_target.state_dict(),
            spec=on_target.spec(),
            config=cfg,
            fingerprint=target.fingerprint,
            stats=reader.stats,
            # its validation MAE was measured on the source: none is claimed for the target
            metrics={
                "transferred_from": {
                    "version": info.version,
                    "dataset": info.dataset,
                    "fingerprint": info.fingerprint,
                    "val_mae": info.val_mae,
                },
            },
            state=info.state,
            role=info.role,
            dataset=target.name,
        )
        copy_tree(location(scratch / "checkpoint"), tmp, last=(META,))
        write_config(cfg, tmp / CONFIG_FILE)
        remove(dest)
        # meta.json last: a reader never takes a half-copied folder for a checkpoint
        copy_tree(tmp, dest, last=(META,))
    finally:
        remove(tmp)
        remove(location(scratch))
    return read_checkpoint(dest)
