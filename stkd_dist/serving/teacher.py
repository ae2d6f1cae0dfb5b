"""The teacher a server serves: a forecaster, the windows it reads, batched inference.

A teacher is loaded from its checkpoint alone (:func:`load_teacher`): the checkpoint holds the
architecture, weights, target statistics and the data section of the config it was trained with
(window, splits, channels), and names the fingerprint of its dataset. The store given to the server
must be that dataset. Inference reads windows with the same :class:`WindowReader` the training
loaders use, so the teacher sees exactly the inputs it saw in training.

Labels: ``prediction`` is the forecast ``[n, H, N, C_out]`` in original units; ``spread`` (teachers
built with ``spread=True`` only) is the log-variance in units² from
:meth:`Forecaster.forward_with_spread`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import SPLITS
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import url
from stkd_dist.models.base import Forecaster
from stkd_dist.storage.store import DatasetStore, open_store

log = logging.getLogger(__name__)

# Windows per model call. CPU kernels (oneDNN convolutions, MKL matmuls) pick their algorithm by
# the batch size, so a window's output can differ in the last bits with the size of the batch it
# was computed in. Running every call in micro-batches of exactly this size (the last one padded)
# makes each window's labels independent of how requests were batched: replicas, the label cache
# and a resumed stream give bitwise identical labels (for the same intra-op thread count).
MICRO_BATCH = 32


@dataclass(frozen=True)
class TeacherMeta:
    """What a teacher serves, as ``Describe`` reports it.

    Attributes:
        version: the teacher version (from its checkpoint).
        model_key: the registry key of its architecture.
        fingerprint: fingerprint of the dataset store it reads.
        window_shape: ``(H, N, C_out)`` of the labels of one window.
        input_steps: ``L``.
        has_spread: whether it outputs a spread (log-variance).
        splits: window indices of each split (``range`` of start steps).
        val_mae: the teacher's validation MAE from its checkpoint metrics (None when unknown);
            students weight teachers by it (``distill.ensemble: inverse_error``).
    """

    version: str
    model_key: str
    fingerprint: str
    window_shape: tuple[int, int, int]
    input_steps: int
    has_spread: bool
    splits: dict[str, range]
    val_mae: float | None = None

    @property
    def horizon(self) -> int:
        return self.window_shape[0]


def safe_version(version: str) -> str:
    """A teacher version usable as a file name (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", version).strip(".") or "_"


class Teacher:
    """A forecaster in eval mode with the reader of its dataset.

    Args:
        model: the teacher forecaster (predicts in original units).
        reader: reads the windows of the teacher's dataset, normalised as in training.
        version: the teacher version clients check.
        val_mae: the teacher's validation MAE (reported by ``Describe``), if known.

    Raises:
        InputError: the reader's data does not fit the model's dimensions.
    """

    def __init__(
        self,
        model: Forecaster,
        reader: WindowReader,
        version: str,
        val_mae: float | None = None,
    ) -> None:
        if not version:
            raise InputError("a teacher needs a non-empty version", where="version")
        if model.dims != reader.dims:
            raise InputError(
                f"the teacher was built for {model.dims} but the data gives {reader.dims}",
                where=str(reader.store.path),
            )
        self.model = model.eval()
        self.reader = reader
        self.version = version
        self._lock = threading.Lock()
        self._forward_windows = 0
        splits = {}
        for split in SPLITS:
            try:
                splits[split] = reader.windows(split)
            except InputError:  # a split too short for a window simply has none
                splits[split] = range(0)
        dims = reader.dims
        self.meta = TeacherMeta(
            version=version,
            model_key=model.key,
            fingerprint=reader.store.fingerprint,
            window_shape=(dims.horizon, dims.nodes, dims.out_channels),
            input_steps=dims.input_steps,
            has_spread=model.has_spread,
            splits=splits,
            val_mae=val_mae,
        )

    @property
    def forward_windows(self) -> int:
        """Windows the model has been run on since this teacher was created."""
        return self._forward_windows

    def predict(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the teacher on windows ``indices``: ``(prediction, spread)`` ``[n, H, N, C_out]``."""
        idx = np.asarray(indices, dtype=np.int64)
        n = int(idx.shape[0])
        if n == 0:  # no windows: empty labels of the right shape
            empty = np.zeros((0, *self.meta.window_shape), dtype=np.float32)
            return empty, (empty.copy() if self.meta.has_spread else None)
        # pad to whole micro-batches with repeats of the last window (see MICRO_BATCH)
        padded = np.concatenate([idx, np.repeat(idx[-1:], -n % MICRO_BATCH)])
        batch = self.reader.batch(padded)
        means, spreads = [], []
        # one model call at a time: the batcher already serialises calls, precompute and tests
        # may call from other threads
        with self._lock, torch.inference_mode():
            for lo in range(0, len(padded), MICRO_BATCH):
                part = slice(lo, lo + MICRO_BATCH)
                x, tod, dow = batch.x[part], batch.time_of_day[part], batch.day_of_week[part]
                if self.meta.has_spread:
                    mean, log_var = self.model.forward_with_spread(x, tod, dow)
                    spreads.append(log_var.float())
                else:
                    mean = self.model(x, tod, dow)
                means.append(mean.float())
            self._forward_windows += n
        spread = torch.cat(spreads)[:n].numpy() if spreads else None
        return torch.cat(means)[:n].numpy(), spread  # [n, H, N, C_out]


def load_teacher(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | DatasetStore,
    storage: str | os.PathLike[str] | None = None,
) -> Teacher:
    """Load the teacher of ``checkpoint`` and the reader of its dataset ``data``.

    Args:
        checkpoint: a checkpoint reference (path, run name, ...; see ``resolve_checkpoint``).
        data: the dataset the teacher was trained on (store path or name, or an opened store).
        storage: storage root override.

    Raises:
        StoreError: ``data`` is not the dataset the teacher was trained on (fingerprint differs).
    """
    from stkd_dist.checkpoint import load_forecaster

    model, info = load_forecaster(checkpoint, role="teacher", storage=storage)
    store = data if isinstance(data, DatasetStore) else open_store(data, storage)
    if info.fingerprint and info.fingerprint != store.fingerprint:
        raise StoreError(
            f"the teacher {info.version} was trained on the dataset with fingerprint "
            f"{info.fingerprint}, this store has {store.fingerprint}: give the same dataset",
            where=str(store.path),
        )
    section = _data_section(info.config)
    reader = WindowReader(
        store,
        window=section.window(),
        splits=section.splits(),
        input_channels=section.input_channels,
        target_channels=section.target_channels or section.input_channels,
        per_node_stats=section.per_node_stats,
    )
    log.info("loaded teacher %s (%s) from %s", info.version, model.key, url(info.path))
    return Teacher(model, reader, str(info.version), val_mae=info.val_mae)


def _data_section(config: Any) -> Any:
    """The ``data`` section of a checkpoint's config (a Config or its mapping)."""
    from stkd_dist.config.base import from_mapping
    from stkd_dist.config.sections import DataSection

    if hasattr(config, "data"):
        return config.data
    if isinstance(config, dict) and isinstance(config.get("data"), dict):
        return from_mapping(DataSection, config["data"], source="checkpoint config", prefix="data")
    raise StoreError("the checkpoint has no data section in its config", where="checkpoint")
