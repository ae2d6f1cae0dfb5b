"""The teacher a server serves: a forecaster, the windows it reads, batched inference.

A teacher is loaded from its checkpoint alone (:func:`load_teacher`): the checkpoint holds the
architecture, weights, target statistics and the data section of the config it was trained with
(window, splits, channels), and names the fingerprint of its dataset. The store given to the server
must be that dataset. Inference reads windows with the same :class:`WindowReader` the training
loaders use, so the teacher sees exactly the inputs it saw in training.

Labels (a :class:`~stkd_dist.serving.label_arrays.LabelArrays`): ``prediction`` is the forecast
``[n, H, N, C_out]`` in original units; ``spread`` (teachers built with ``spread=True`` only) is the
log-variance in units² from :meth:`Forecaster.forward_with_spread`; ``hidden`` (when asked for) is
the teacher's hidden representation ``[n, N, F]`` (``Forecaster(..., output="features")``), for
hint distillation.

How labels are computed (device, precision, windows per model call) is the teacher's
:class:`~stkd_dist.serving.forward.ComputeSettings`; every forward pass runs through the one
micro-batched forward of :mod:`stkd_dist.serving.forward`. A forward pass has two halves the
server's pipeline runs in different threads: :meth:`Teacher.prepare` (read and decode the input
windows, through a small LRU of decoded store chunks) and :meth:`Teacher.run` (the model calls).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import SPLITS
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import PathInput, url
from stkd_dist.models.base import Forecaster
from stkd_dist.serving.forward import (
    DEFAULT_KEYS,
    DEFAULT_MICRO_BATCH,
    ComputeKeys,
    ComputeSettings,
    PreparedBatch,
    forward_micro_batches,
    prepare_inputs,
    resolve_compute,
)
from stkd_dist.serving.label_arrays import NumpyLabels
from stkd_dist.storage.store import DatasetStore, open_store

log = logging.getLogger(__name__)

# The default windows per model call (the setting is ComputeSettings.micro_batch; see
# stkd_dist.serving.forward for why it fixes the labels' bits). Kept under its old name for
# callers that compare against the default.
MICRO_BATCH = DEFAULT_MICRO_BATCH


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
        hidden_dim: F of its hidden representation ``[N, F]`` per window (0: unknown).
    """

    version: str
    model_key: str
    fingerprint: str
    window_shape: tuple[int, int, int]
    input_steps: int
    has_spread: bool
    splits: dict[str, range]
    val_mae: float | None = None
    hidden_dim: int = 0

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
        compute: device, precision and micro-batch (default: the CPU, fp32, 32 windows); the
            model is moved to the device if it is not there yet.

    Raises:
        InputError: the reader's data does not fit the model's dimensions.
    """

    def __init__(
        self,
        model: Forecaster,
        reader: WindowReader,
        version: str,
        val_mae: float | None = None,
        *,
        compute: ComputeSettings | None = None,
    ) -> None:
        if not version:
            raise InputError("a teacher needs a non-empty version", where="version")
        if model.dims != reader.dims:
            raise InputError(
                f"the teacher was built for {model.dims} but the data gives {reader.dims}",
                where=str(reader.store.path),
            )
        self.compute = compute if compute is not None else ComputeSettings()
        self.model = model.to(self.compute.torch_device).eval()
        self.reader = reader
        # consecutive batches read the same time chunks: decode each once
        reader.use_block_cache()
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
            # measured once on the model's device (one window), before any server thread runs
            hidden_dim=self.model.hidden_dim(),
        )

    @property
    def forward_windows(self) -> int:
        """Windows the model has been run on since this teacher was created (not padding)."""
        return self._forward_windows

    @property
    def micro_batch(self) -> int:
        """Windows per model call."""
        return self.compute.micro_batch

    def prepare(self, indices: Sequence[int] | np.ndarray) -> PreparedBatch:
        """Read the inputs of windows ``indices``, padded to whole micro-batches (any thread)."""
        return prepare_inputs(self.reader, indices, self.compute)

    def run(self, batch: PreparedBatch, *, hidden: bool = False) -> NumpyLabels:
        """Run the model on prepared inputs: prediction (and spread) ``[n, H, N, C_out]``, and
        with ``hidden`` the hidden states ``[n, N, F]``."""
        # one model call at a time: the server's forward thread is the only caller there, but
        # precompute threads and tests may call from several threads
        with self._lock:
            labels = forward_micro_batches(self.model, batch, self.compute, hidden=hidden)
            self._forward_windows += batch.n
        return labels

    def predict(self, indices: Sequence[int] | np.ndarray, *, hidden: bool = False) -> NumpyLabels:
        """Run the teacher on windows ``indices`` (see :meth:`run`)."""
        return self.run(self.prepare(indices), hidden=hidden)


def load_teacher(
    checkpoint: PathInput,
    data: PathInput | DatasetStore,
    storage: PathInput | None = None,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    micro_batch: int = DEFAULT_MICRO_BATCH,
    keys: ComputeKeys = DEFAULT_KEYS,
) -> Teacher:
    """Load the teacher of ``checkpoint`` and the reader of its dataset ``data``.

    Args:
        checkpoint: a checkpoint reference (path, run name, ...; see ``resolve_checkpoint``).
        data: the dataset the teacher was trained on (store path or name, or an opened store).
        storage: storage root override.
        device: ``cpu`` (default), ``cuda``, ``cuda:<i>`` or ``auto``; the weights are loaded
            straight onto it.
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` (CUDA autocast).
        micro_batch: windows per model call (default 32).
        keys: how the three settings are named in errors (e.g. ``SERVE_KEYS``).

    Raises:
        StoreError: ``data`` is not the dataset the teacher was trained on (fingerprint differs).
        ConfigError: compute settings this machine cannot run (checked before loading).
    """
    from stkd_dist.checkpoint import load_forecaster

    compute = resolve_compute(device, precision, micro_batch, keys)
    model, info = load_forecaster(
        checkpoint, role="teacher", storage=storage, device=compute.device
    )
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
        # the checkpoint's training windows (an update's recent days): what it labels as "train"
        recent_days=section.recent_days,
    )
    log.info(
        "loaded teacher %s (%s) from %s (%s)",
        info.version,
        model.key,
        url(info.path),
        compute.describe(),
    )
    return Teacher(model, reader, str(info.version), val_mae=info.val_mae, compute=compute)


def _data_section(config: Any) -> Any:
    """The ``data`` section of a checkpoint's config (a Config or its mapping)."""
    from stkd_dist.config.base import from_mapping
    from stkd_dist.config.sections import DataSection

    if hasattr(config, "data"):
        return config.data
    if isinstance(config, dict) and isinstance(config.get("data"), dict):
        return from_mapping(DataSection, config["data"], source="checkpoint config", prefix="data")
    raise StoreError("the checkpoint has no data section in its config", where="checkpoint")
