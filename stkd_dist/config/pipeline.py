"""Config sections of the one-command pipeline (``stkd distill``): serving and evaluation.

* ``serve``: how student workers get the teacher's soft labels during ``stkd distill``;
* ``evaluate``: what the final evaluation measures besides the test metrics (latency, forecasts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stkd_dist.config.sections import positive, require

ServeMode = Literal["stream", "cache"]
WireDtype = Literal["float32", "float16", "bfloat16"]


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
    """

    mode: ServeMode = "stream"
    replicas: int = 2
    endpoints: str | None = None
    wire_dtype: WireDtype = "float32"
    batch_size: int = 64
    cpus_per_replica: float = 0.5

    def __post_init__(self) -> None:
        positive(self, "replicas", "batch_size")
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
