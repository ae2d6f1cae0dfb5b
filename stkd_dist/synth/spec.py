"""Parameters of a synthetic traffic dataset.

A :class:`SynthSpec` fully determines a synthetic dataset: two stores made from equal specs have
equal fingerprints, whatever their chunking. Every field is validated here, so the generator can
trust its inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from stkd_dist.errors import ConfigError

#: Bumped whenever a change to the generator changes its output for the same spec.
GENERATOR_VERSION = 1

#: Channels the generator can produce, with their units.
CHANNEL_UNITS = {
    "flow": "vehicles per step",
    "occupancy": "fraction of time the detector is occupied (0-1)",
    "speed": "mph",
}

# Limits that keep one generated block (and the dense adjacency the store keeps) in memory.
MAX_NODES = 20_000
MIN_STEP = pd.Timedelta("1min")
MAX_STEP = pd.Timedelta("1h")


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Attributes:
        nodes: number of sensors (graph nodes), 2 to ``MAX_NODES``.
        steps: number of time steps, at least 1.
        seed: non-negative random seed; the same seed gives the same data.
        freq: step length as a pandas frequency string, 1 min to 1 h (e.g. ``"5min"``).
        start: timestamp of the first step (naive, local time).
        channels: names from ``CHANNEL_UNITS`` (``flow`` first by default).
        mean_degree: target mean number of neighbours in the road graph.
        diffusion: share of a node's flow that arrives from its neighbours' past (0-1).
        lag_minutes: travel time between neighbouring sensors.
        noise_std: stationary std of the multiplicative AR(1) demand noise.
        noise_tau_minutes: correlation time of that noise.
        incident_rate: incidents per node per day.
        outage_rate: sensor outages per node per day.
        sporadic_missing: probability that a single reading is missing.
    """

    nodes: int
    steps: int
    seed: int = 0
    freq: str = "5min"
    start: str = "2024-01-01 00:00:00"
    channels: tuple[str, ...] = ("flow",)
    mean_degree: float = 5.0
    diffusion: float = 0.5
    lag_minutes: float = 10.0
    noise_std: float = 0.12
    noise_tau_minutes: float = 30.0
    incident_rate: float = 0.05
    outage_rate: float = 0.04
    sporadic_missing: float = 0.003
    generator_version: int = field(default=GENERATOR_VERSION)

    def __post_init__(self) -> None:
        _check_int(self.nodes, "--nodes", 2, MAX_NODES)
        _check_int(self.steps, "--steps", 1, None)
        _check_int(self.seed, "--seed", 0, 2**63 - 1)
        step = self.step
        if not MIN_STEP <= step <= MAX_STEP:
            raise ConfigError(
                f"step length must be between {MIN_STEP} and {MAX_STEP}, got {self.freq!r}",
                where="--freq",
            )
        try:
            start = pd.Timestamp(self.start)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"not a timestamp: {self.start!r} ({e})", where="--start") from e
        if start.tzinfo is not None:
            raise ConfigError("give a naive local timestamp (no time zone)", where="--start")
        # normalise so that equal timestamps give equal specs (and equal reuse checks)
        object.__setattr__(self, "start", start.isoformat())
        channels = tuple(self.channels)
        object.__setattr__(self, "channels", channels)
        if not channels:
            raise ConfigError("give at least one channel", where="--channels")
        for name in channels:
            if name not in CHANNEL_UNITS:
                raise ConfigError(
                    f"unknown channel {name!r}; choose from {', '.join(CHANNEL_UNITS)}",
                    where="--channels",
                )
        if len(set(channels)) != len(channels):
            raise ConfigError(f"channels repeat: {','.join(channels)}", where="--channels")
        _check_float(self.mean_degree, "mean_degree", 1.0, 50.0)
        _check_float(self.diffusion, "diffusion", 0.0, 0.9)
        _check_float(self.lag_minutes, "lag_minutes", 0.0, 120.0)
        _check_float(self.noise_std, "noise_std", 0.0, 0.5)
        _check_float(self.noise_tau_minutes, "noise_tau_minutes", 1.0, 24 * 60.0)
        _check_float(self.incident_rate, "incident_rate", 0.0, 10.0)
        _check_float(self.outage_rate, "outage_rate", 0.0, 10.0)
        _check_float(self.sporadic_missing, "sporadic_missing", 0.0, 0.5)
        if self.generator_version != GENERATOR_VERSION:
            raise ConfigError(
                f"this stkd-dist generates version {GENERATOR_VERSION}, "
                f"got {self.generator_version}",
                where="generator_version",
            )

    # -- derived quantities ----------------------------------------------------------------
    @property
    def step(self) -> pd.Timedelta:
        """Length of one step."""
        try:
            step = pd.Timedelta(pd.tseries.frequencies.to_offset(self.freq))
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"not a fixed frequency such as '5min' or '1h': {self.freq!r}", where="--freq"
            ) from e
        return step

    @property
    def step_minutes(self) -> float:
        return self.step / pd.Timedelta("1min")

    @property
    def lag_steps(self) -> int:
        """Travel time between neighbours in steps (at least one step)."""
        return max(1, round(self.lag_minutes / self.step_minutes))

    @property
    def noise_phi(self) -> float:
        """AR(1) coefficient per step of the demand noise."""
        return math.exp(-self.step_minutes / self.noise_tau_minutes)

    @property
    def time(self) -> pd.DatetimeIndex:
        """One timestamp per step."""
        return pd.date_range(pd.Timestamp(self.start), periods=self.steps, freq=self.step)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in the dataset's ``synth`` attribute)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SynthSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**{**d, "channels": tuple(d["channels"])})


def _check_int(value: Any, where: str, lo: int, hi: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"must be an integer, got {value!r}", where=where)
    if value < lo or (hi is not None and value > hi):
        rule = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"must be {rule}, got {value}", where=where)


def _check_float(value: Any, where: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"must be a number between {lo:g} and {hi:g}, got {value!r}", where=where)
