"""Config sections of the one-command pipeline (``stkd distill``): serving and evaluation.

* ``serve``: how student workers get the teacher's soft labels during ``stkd distill``;
* ``evaluate``: what the final evaluation measures besides the test metrics (latency, forecasts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from stkd_dist.config.sections import positive, require

ServeMode = Literal["stream", "cache"]
WireDtype = Literal["float32", "float16", "bfloat16"]
Precision = Literal["fp32", "bf16", "fp16"]

#: the precisions a teacher can compute its labels in (``bf16``/``fp16``: CUDA autocast only)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: devices a teacher can run on: ``auto`` (CUDA when available, else the CPU), ``cpu``,
#: ``cuda`` (the current CUDA device) or ``cuda:<i>``
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
#: windows per model call unless configured: changing it changes the labels' last bits
DEFAULT_MICRO_BATCH = 32


def check_compute_syntax(
    device: str, precision: str, micro_batch: int, keys: tuple[str, str, str]
) -> None:
    """The checks of a teacher's compute settings that hold on any machine.

    ``keys`` name the device, precision and micro-batch settings in errors (config keys or
    command-line flags). Whether the device exists is checked where the teacher is loaded
    (:func:`stkd_dist.serving.forward.resolve_compute`): the machine that reads a config may not
    be the one that serves.
    """
    require(
        isinstance(device, str) and bool(DEVICE_PATTERN.match(device)),
        keys[0],
        f"must be auto, cpu, cuda or cuda:<index>, got {device!r}",
    )
    require(
        precision in PRECISIONS,
        keys[1],
        f"must be one of {', '.join(PRECISIONS)}, got {precision!r}",
    )
    require(
        not (device == "cpu" and precision != "fp32"),
        keys[1],
        f"{precision} needs a CUDA device but {keys[0]} is cpu: the CPU computes in fp32 only "
        "(CPU autocast lacks bf16 kernels of some models, e.g. the LSTM, on CPUs without "
        "native bf16)",
    )
    require(
        isinstance(micro_batch, int) and micro_batch > 0,
        keys[2],
        f"must be > 0, got {micro_batch!r}",
    )


@dataclass(frozen=True)
class AutoscaleSection:
    """``serve.autoscale``: grow and shrink the started replicas with the students' backlog.

    Attributes:
        min: fewest replicas (the fleet starts with ``max(min, serve.replicas)`` capped to ``max``).
        max: most replicas (fewer when the cluster lacks the CPUs / GPUs of another one).
        target_wait: the students' share of step time spent waiting for labels (0..1) above
            which a replica is added.
        interval_s: seconds between two decisions (and the window the share is measured over).
        idle_s: seconds a replica must have served no stream before it is removed.
    """

    min: int = 1
    max: int = 4
    target_wait: float = 0.2
    interval_s: float = 5.0
    idle_s: float = 20.0

    def __post_init__(self) -> None:
        positive(self, "min", "max")
        require(self.max >= self.min, "max", f"must be >= min ({self.min}), got {self.max}")
        require(
            0 < self.target_wait < 1, "target_wait", f"must be in (0, 1), got {self.target_wait}"
        )
        require(self.interval_s > 0, "interval_s", f"must be > 0, got {self.interval_s}")
        require(self.idle_s >= 0, "idle_s", f"must be >= 0, got {self.idle_s}")


@dataclass(frozen=True)
class ServeSection:
    """``serve``: where the distilled student's soft labels come from.

    Attributes:
        mode: ``stream``: teacher replicas (gRPC servers) stream each worker's labels while it
            trains; ``cache``: the teacher is run once over every window into the run's label
            cache (Zarr) and the workers read labels from it, without a server.
        replicas: teacher servers started as Ray actors in ``stream`` mode (ignored when
            ``endpoints`` is set).
        endpoints: already running teacher servers (``host:port,...``, ``dns:///name:port`` or
            ``ray:PREFIX``) to stream from instead of starting replicas; null = start them.
        wire_dtype: dtype of the labels on the wire (``float16`` halves the traffic).
        batch_size: most windows per teacher forward pass (server batching and cache filling).
        cpus_per_replica: CPUs Ray reserves for each replica actor (fractions allowed).
        write_through: started replicas share the run's label cache (``<run>/labels/``) and
            store every window they compute in it, so the teacher computes each window once
            however many epochs and students read it; false = compute on every request.
        device: where a replica runs its teacher: ``cpu`` (default: labels bitwise equal to a
            CPU label cache), ``cuda``, ``cuda:<i>`` or ``auto`` (CUDA when the replica's machine
            has it, else the CPU). Whether CUDA exists is checked where the teacher loads.
        precision: ``fp32`` (default), or ``bf16`` / ``fp16`` under CUDA autocast (CUDA only:
            the CPU computes in fp32).
        micro_batch: windows per model call, the last one padded (default 32). CPU kernels pick
            their algorithm by batch size, so a fixed micro-batch keeps the labels' bits
            independent of how requests were batched: keep it fixed per teacher version (label
            caches record it).
        threads: torch intra-op threads of each started replica (null = its process's default;
            Ray sets it from the replica's CPUs). Some CPU kernels' last bits depend on it: keep
            it fixed per teacher version, like ``micro_batch``.
        max_streams: most concurrent streams one replica admits; a student whose replica is
            full goes to another one, or waits for a free slot (never an error).
        secure: started replicas are private: the run generates a bearer token, a CA and a
            certificate per replica, binds each replica on its node's address and serves over
            TLS. false = plaintext on 127.0.0.1 (one machine only).
        replicas_per_node: start this many replicas on every alive node instead of
            ``replicas`` spread over the nodes (null = ``replicas``).
        autoscale: grow and shrink the started replicas with the students' label wait (null =
            a fixed fleet); see :class:`AutoscaleSection`.
        tls_ca: the CA certificate (PEM file or URL) that the certificates of ``endpoints`` are
            signed by: the driver reads it and hands it to the workers (they need no copy);
            null = plaintext to ``endpoints``. Started replicas use the run's own CA.
    """

    mode: ServeMode = "stream"
    replicas: int = 2
    endpoints: str | None = None
    wire_dtype: WireDtype = "float32"
    batch_size: int = 64
    cpus_per_replica: float = 0.5
    write_through: bool = True
    device: str = "cpu"
    precision: Precision = "fp32"
    micro_batch: int = DEFAULT_MICRO_BATCH
    threads: int | None = None
    max_streams: int = 16
    secure: bool = True
    replicas_per_node: int | None = None
    autoscale: AutoscaleSection | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        positive(self, "replicas", "batch_size", "max_streams")
        require(
            self.threads is None or self.threads >= 1,
            "threads",
            f"must be >= 1 or null, got {self.threads!r}",
        )
        require(
            self.replicas_per_node is None or self.replicas_per_node >= 1,
            "replicas_per_node",
            f"must be >= 1 or null, got {self.replicas_per_node!r}",
        )
        require(
            self.autoscale is None or self.replicas_per_node is None,
            "autoscale",
            "autoscaling sizes the fleet itself: drop serve.replicas_per_node or serve.autoscale",
        )
        # the section's own field names: loading prefixes them with "serve."
        check_compute_syntax(
            self.device, self.precision, self.micro_batch, ("device", "precision", "micro_batch")
        )
        require(
            self.cpus_per_replica >= 0,
            "cpus_per_replica",
            f"must be >= 0, got {self.cpus_per_replica!r}",
        )
        require(
            self.endpoints is None or bool(self.endpoints.strip()),
            "endpoints",
            "must list host:port endpoints or be null",
        )


@dataclass(frozen=True)
class EvaluateSection:
    """``evaluate``: the final evaluation of every model and baseline on the test split.

    Attributes:
        latency_batch_size: windows in the batch whose CPU forward time is measured (the same
            batch for every model).
        latency_warmup: untimed forward passes of each model before timing.
        latency_repeats: timed forward passes of each model; the median is reported.
        forecast_sensors: sensors shown in the report's forecast-vs-truth panels.
        forecast_step: which step ahead those panels show (1 = the next step); null = the last
            step of the horizon.
    """

    latency_batch_size: int = 64
    latency_warmup: int = 3
    latency_repeats: int = 15
    forecast_sensors: int = 4
    forecast_step: int | None = None

    def __post_init__(self) -> None:
        positive(self, "latency_batch_size", "latency_repeats", "forecast_sensors")
        require(
            self.forecast_step is None or self.forecast_step > 0,
            "forecast_step",
            f"must be > 0 or null, got {self.forecast_step!r}",
        )
        require(
            self.latency_warmup >= 0,
            "latency_warmup",
            f"must be >= 0, got {self.latency_warmup!r}",
        )


@dataclass(frozen=True)
class UpdateSection:
    """``update``: how ``stkd update`` follows data appended to the store (online distillation).

    Attributes:
        days: the teacher and the student fine-tune on the windows of the last ``days`` days of
            the training split (the data that arrived), from their best checkpoints.
        teacher_epochs: epochs of the teacher's fine-tune.
        student_epochs: epochs of the student's fine-tune (on the new version's labels).
        evaluate_days: the newest days of the test split the old and the updated models are
            compared on, besides the whole test split (null = ``days``).
    """

    days: int = 1
    teacher_epochs: int = 2
    student_epochs: int = 2
    evaluate_days: int | None = None

    def __post_init__(self) -> None:
        positive(self, "days", "teacher_epochs", "student_epochs")
        require(
            self.evaluate_days is None or self.evaluate_days > 0,
            "evaluate_days",
            f"must be > 0 or null, got {self.evaluate_days!r}",
        )
