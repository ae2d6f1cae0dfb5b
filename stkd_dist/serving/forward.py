"""The one micro-batched forward pass of a teacher, shared by the server and the cache fill.

Everything that runs a teacher over windows (:meth:`Teacher.predict
<stkd_dist.serving.teacher.Teacher.predict>`, the server's pipeline, ``stkd precompute-labels``)
goes through :func:`prepare_inputs` and :func:`forward_micro_batches`, so a window's labels are
computed the same way wherever they are computed.

Compute settings (:class:`ComputeSettings`):

* ``micro_batch``: windows per model call. CPU kernels (oneDNN convolutions, MKL matmuls) pick
  their algorithm by the batch size, so a window's output can differ in the last bits with the
  size of the batch it was computed in. Every call runs micro-batches of exactly this size (the
  last one padded with repeats of the last window), which makes each window's labels independent
  of how requests were batched: replicas, the label cache and a resumed stream give bitwise
  identical labels for the same settings and intra-op thread count. Keep it fixed per teacher
  version; label caches record it.
* ``device``: ``cpu`` or ``cuda[:i]``; ``auto`` resolves to CUDA when available, else the CPU.
* ``precision``: ``fp32``, or ``bf16`` / ``fp16`` under CUDA autocast. The CPU computes in fp32
  only: CPU autocast has no bf16 kernels for some models (oneDNN refuses the LSTM on CPUs without
  native bf16), and a setting that works for one architecture but not the next is refused up
  front instead.

Labels always come back as float32 numpy arrays on the CPU, whatever the device and precision,
as one :class:`~stkd_dist.serving.label_arrays.LabelArrays`: the prediction, the spread of a
teacher that has one and, when asked for (``hidden=True``), the teacher's hidden representation
``[n, N, F]``. Asking for the hidden states changes nothing else: the model runs the same network
call either way (:meth:`Forecaster.forward` only picks what it returns), so the predictions of a
pass with hidden states are bitwise those of a pass without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stkd_dist.config.pipeline import (
    DEFAULT_MICRO_BATCH,
    DEVICE_PATTERN,
    PRECISIONS,
    check_compute_syntax,
)
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError
from stkd_dist.models.base import Forecaster
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels, empty_labels

__all__ = [
    "CLI_KEYS",
    "DEFAULT_KEYS",
    "DEFAULT_MICRO_BATCH",
    "PRECISIONS",
    "SERVE_KEYS",
    "ComputeKeys",
    "ComputeSettings",
    "PreparedBatch",
    "forward_micro_batches",
    "pad_to_micro_batches",
    "prepare_inputs",
    "resolve_compute",
]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ComputeKeys:
    """How the compute settings are named in error messages (config keys or flags)."""

    device: str = "device"
    precision: str = "precision"
    micro_batch: str = "micro_batch"

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.device, self.precision, self.micro_batch)


#: plain field names (library callers)
DEFAULT_KEYS = ComputeKeys()
#: the ``serve:`` config section's keys
SERVE_KEYS = ComputeKeys("serve.device", "serve.precision", "serve.micro_batch")
#: the flags of ``stkd serve`` / ``stkd precompute-labels``
CLI_KEYS = ComputeKeys("--device", "--precision", "--micro-batch")


@dataclass(frozen=True)
class ComputeSettings:
    """How a teacher computes its labels (see the module docstring).

    Attributes:
        device: a resolved torch device: ``cpu``, ``cuda`` or ``cuda:<i>`` (not ``auto``: see
            :func:`resolve_compute`, which also checks that the device exists).
        precision: ``fp32``, ``bf16`` or ``fp16`` (the last two on CUDA only).
        micro_batch: windows per model call.

    Raises:
        ConfigError: a malformed setting, or a precision the device does not offer.
    """

    device: str = "cpu"
    precision: str = "fp32"
    micro_batch: int = DEFAULT_MICRO_BATCH

    def __post_init__(self) -> None:
        if self.device == "auto":
            raise ConfigError("resolve 'auto' with resolve_compute first", where="device")
        check_compute_syntax(self.device, self.precision, self.micro_batch, DEFAULT_KEYS.as_tuple())

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda`` (what label caches record)."""
        return self.device.split(":", 1)[0]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def describe(self) -> str:
        """E.g. ``micro_batch 32, fp32 on cpu``."""
        return f"micro_batch {self.micro_batch}, {self.precision} on {self.device_type}"


def resolve_compute(
    device: str = "cpu",
    precision: str = "fp32",
    micro_batch: int = DEFAULT_MICRO_BATCH,
    keys: ComputeKeys = DEFAULT_KEYS,
) -> ComputeSettings:
    """Check compute settings against this machine and resolve ``auto``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        micro_batch: windows per model call.
        keys: the names of the three settings in errors (e.g. :data:`SERVE_KEYS`).

    Raises:
        ConfigError: naming the key: a malformed value, CUDA asked for on a machine without it,
            a CUDA index past the visible devices, fp16/bf16 on the CPU, bf16 on a GPU without it.
    """
    device = str(device).strip().lower()
    if not DEVICE_PATTERN.match(device):
        raise ConfigError(
            f"must be auto, cpu, cuda or cuda:<index>, got {device!r}", where=keys.device
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{device} requested but torch.cuda.is_available() is False", where=keys.device
            )
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{device} requested but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible",
                where=keys.device,
            )
        device = f"cuda:{index}"
    check_compute_syntax(device, precision, micro_batch, keys.as_tuple())
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"bf16 requested but {torch.cuda.get_device_name(device)} does not support it; use "
            "fp16 or fp32",
            where=keys.precision,
        )
    return ComputeSettings(device=device, precision=precision, micro_batch=int(micro_batch))


def pad_to_micro_batches(indices: np.ndarray, micro_batch: int) -> np.ndarray:
    """``indices`` ``[n]`` followed by repeats of the last one up to whole micro-batches."""
    n = int(indices.shape[0])
    return np.concatenate([indices, np.repeat(indices[-1:], -n % micro_batch)])


@dataclass
class PreparedBatch:
    """Model inputs of ``n`` windows, padded to whole micro-batches (on the CPU).

    Attributes:
        n: the windows asked for (the rest is padding).
        x: ``[m * B, L, N, C_in]`` float32 normalised inputs (pinned memory for a CUDA device).
        time_of_day: ``[m * B, L]`` float32.
        day_of_week: ``[m * B, L]`` int64.
    """

    n: int
    x: torch.Tensor
    time_of_day: torch.Tensor
    day_of_week: torch.Tensor


def prepare_inputs(
    reader: WindowReader, indices: Sequence[int] | np.ndarray, compute: ComputeSettings
) -> PreparedBatch:
    """Read and normalise the inputs of windows ``indices``, padded to whole micro-batches.

    This is the I/O half of a forward pass (Zarr reads, decoding, normalisation): the server runs
    it in its read-ahead thread while the device computes the previous batch.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = int(idx.shape[0])
    if n == 0:
        return PreparedBatch(0, torch.empty(0), torch.empty(0), torch.empty(0))
    batch = reader.batch(pad_to_micro_batches(idx, compute.micro_batch))
    x, tod, dow = batch.x, batch.time_of_day, batch.day_of_week
    if compute.device_type == "cuda":
        # page-locked: the forward thread's host-to-device copies run asynchronously
        x, tod, dow = x.pin_memory(), tod.pin_memory(), dow.pin_memory()
    return PreparedBatch(n, x, tod, dow)


@contextlib.contextmanager
def _precision(compute: ComputeSettings) -> Iterator[None]:
    """Autocast for bf16 / fp16 (CUDA only, see :class:`ComputeSettings`); fp32 runs as is."""
    dtype = _AUTOCAST_DTYPES.get(compute.precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=compute.device_type, dtype=dtype):
        yield


def forward_micro_batches(
    model: Forecaster, batch: PreparedBatch, compute: ComputeSettings, *, hidden: bool = False
) -> NumpyLabels:
    """Run ``model`` (already on ``compute.device``) on ``batch``, one micro-batch per call.

    Returns the labels float32 on the CPU: ``prediction`` (and ``spread`` of a teacher with
    spread) ``[n, H, N, C_out]``; with ``hidden`` also the hidden representation ``[n, N, F]``.
    The caller serialises calls on one model.
    """
    dims = model.dims
    window_shape = (dims.horizon, dims.nodes, dims.out_channels)
    has_spread = model.has_spread
    if batch.n == 0:
        return empty_labels(window_shape, has_spread, model.hidden_dim() if hidden else 0)
    device = compute.torch_device
    on_cpu = device.type == "cpu"
    b = compute.micro_batch
    means: list[torch.Tensor] = []  # [B, H, N, C_out] each, on the device
    spreads: list[torch.Tensor] = []
    hiddens: list[torch.Tensor] = []  # [B, N, F] each
    with torch.inference_mode(), _precision(compute):
        for lo in range(0, batch.x.shape[0], b):
            # dim-0 slices of contiguous tensors: views, no copy on the CPU; on CUDA the copies
            # from pinned memory are asynchronous and overlap the previous micro-batch's kernels
            x, tod, dow = (
                t[lo : lo + b] if on_cpu else t[lo : lo + b].to(device, non_blocking=True)
                for t in (batch.x, batch.time_of_day, batch.day_of_week)
            )
            if hidden:
                # the same network call as below; "all" also returns what the head reads
                out = model(x, tod, dow, output="all")
                mean = out.mean
                hiddens.append(out.hidden.float())
                if out.log_var is not None:
                    spreads.append(out.log_var.float())
            elif has_spread:
                mean, log_var = model.forward_with_spread(x, tod, dow)
                spreads.append(log_var.float())
            else:
                mean = model(x, tod, dow)
            means.append(mean.float())
        # one device-to-host copy per output, after the last kernel (it synchronises the stream)
        prediction = torch.cat(means)[: batch.n].cpu().numpy()
        spread = torch.cat(spreads)[: batch.n].cpu().numpy() if spreads else None
        states = torch.cat(hiddens)[: batch.n].cpu().numpy() if hiddens else None
    return LabelArrays(prediction, spread, states)
