"""The synthetic traffic process, generated block by block.

Per node, a latent demand follows a daily and weekly profile (morning and evening peaks on
weekdays, a weaker midday hump at weekends) times ``1 + e`` where ``e`` is an AR(1) noise. Flow is
then diffused over the road graph with a travel-time lag::

    x_t = F_t * ((1 - a) * own_t + a * W_norm x_{t-lag})

so a node's future depends on its neighbours' past. ``F`` holds incidents: random events that cut
the flow at a node and, later and weaker, at its one- and two-hop upstream neighbours (queues spill
back). Sensor outages (intervals) and sporadic single readings are missing (NaN).

Chunking independence: time is cut into fixed blocks of ``BLOCK_STEPS`` steps, whatever the store's
chunks. A block is generated on its own: it re-runs the recursion from zero state over a burn-in
period before its first step. All random numbers are drawn per fixed sub-block of ``SUB_BLOCK``
steps from a generator seeded by ``(seed, stream, sub-block)``, so the burn-in replays exactly the
innovations of the previous block's tail; the state it reaches differs from an uninterrupted run by
less than ``1e-9`` relatively. Blocks are therefore independent tasks, and a value depends only on
the spec and its step (not on the chunking, nor on the number of steps after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stkd_dist.synth.graph import RoadGraph, random_road_graph
from stkd_dist.synth.spec import SynthSpec

#: Steps per random-number sub-block (one day at 5 min); blocks and burn-in are multiples of it.
SUB_BLOCK = 288
#: Steps per generated block (one week at 5 min). Fixed: changing it changes the data.
BLOCK_STEPS = 7 * SUB_BLOCK

# Random streams: every kind of randomness has its own, so switching one feature off (e.g.
# incidents) or adding a channel leaves every other number unchanged.
_GRAPH, _PARAMS, _NOISE, _INCIDENT, _OUTAGE, _SPORADIC, _SPEED = range(7)

_DAY = pd.Timedelta("1D")
INCIDENT_MINUTES = (15.0, 120.0)
OUTAGE_MINUTES = (30.0, 720.0)
INCIDENT_SEVERITY = (0.3, 0.8)
# Severity at one and two hops upstream, relative to the incident node.
SPILLBACK = (0.5, 0.25)


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    # SeedSequence takes non-negative words only; burn-in sub-blocks before step 0 are negative.
    return np.random.default_rng([seed, stream, int(index < 0), abs(index)])


@dataclass(frozen=True)
class Events:
    """Intervals ``[start, stop)`` (global steps) at ``node``, with a ``severity`` in [0, 1]."""

    node: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    severity: np.ndarray

    def __len__(self) -> int:
        return int(self.node.size)


class TrafficModel:
    """The road graph, per-node parameters and the block generator of one :class:`SynthSpec`."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        self.graph: RoadGraph = random_road_graph(
            spec.nodes, _rng(spec.seed, _GRAPH), spec.mean_degree
        )
        self._indptr, self._nbr, self._nbr_weight = self.graph.neighbour_csr()
        p = _rng(spec.seed, _PARAMS)
        n = spec.nodes
        x = self.graph.xy[:, 0]
        # Peak flow per step: ~420 vehicles per 5 min, log-normal across sensors.
        self.base = 420.0 * np.exp(p.normal(0.0, 0.3, n)) * spec.step_minutes / 5.0
        # Morning peaks are stronger in the west, evening peaks in the east (commuters), so that
        # nearby sensors share their shape.
        self.am = np.clip(0.55 + 0.4 * (1 - x) + p.normal(0, 0.08, n), 0.3, 1.1)
        self.pm = np.clip(0.55 + 0.4 * x + p.normal(0, 0.08, n), 0.3, 1.1)
        self.midday = p.uniform(0.35, 0.55, n)
        self.weekend = p.uniform(0.45, 0.7, n)
        self.night = p.uniform(0.05, 0.1, n)
        self.shift = p.normal(0.0, 0.25, n)  # hours
        self.free_speed = p.uniform(60.0, 70.0, n)  # mph

        lag = spec.lag_steps
        # Burn-in long enough that the zero start state is forgotten (< 1e-9 relative): the AR
        # noise decays as phi^t, the diffusion as a^(t/lag).
        need = max(21.0 * spec.noise_tau_minutes / spec.step_minutes, 30.0 * lag, 1.0)
        self.burn_in = SUB_BLOCK * math.ceil(need / SUB_BLOCK)

    def __dask_tokenize__(self) -> Any:
        # the spec determines everything, and hashing it is cheap
        return ("stkd-synth", sorted(self.spec.to_json().items()))

    # -- blocks ------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return math.ceil(self.spec.steps / BLOCK_STEPS)

    def block_bounds(self, k: int) -> tuple[int, int]:
        """Global steps ``[start, stop)`` of block ``k``."""
        return k * BLOCK_STEPS, min(self.spec.steps, (k + 1) * BLOCK_STEPS)

    def block(self, k: int) -> np.ndarray:
        """Block ``k`` as float32 ``[step, node, channel]``; missing readings are NaN."""
        t0, t1 = self.block_bounds(k)
        return self.generate(t0, t1)

    def generate(self, t0: int, t1: int, burn_in: int | None = None) -> np.ndarray:
        """Steps ``[t0, t1)`` after running the recursion from ``t0 - burn_in``.

        ``t0`` and ``burn_in`` must be multiples of ``SUB_BLOCK``. Use a block start for
        reproducible output; other values serve tests of the burn-in (a longer burn-in must not
        change the values).
        """
        spec = self.spec
        burn = self.burn_in if burn_in is None else burn_in
        assert t0 % SUB_BLOCK == 0 and burn % SUB_BLOCK == 0, "generation is sub-block aligned"
        out = np.empty((t1 - t0, spec.nodes, len(spec.channels)), dtype=np.float32)
        phi = spec.noise_phi
        innovation = np.float32(spec.noise_std * math.sqrt(1 - phi**2))
        a, lag = spec.diffusion, spec.lag_steps
        noise = np.zeros(spec.nodes)  # AR(1) state e_{t-1}: [node]
        history: np.ndarray | None = None  # flow of the last `lag` steps: [lag, node]
        # One sub-block at a time with the recursion state carried over, so that memory is a few
        # [SUB_BLOCK, node] arrays plus the output, whatever the block and burn-in lengths.
        for p0 in range(t0 - burn, t1, SUB_BLOCK):
            p1 = min(p0 + SUB_BLOCK, t1)
            eps = self._normals(_NOISE, p0, p1) * innovation  # [p, node]
            e = np.empty((p1 - p0, spec.nodes))
            for t in range(p1 - p0):
                noise = phi * noise + eps[t]
                e[t] = noise
            own = self.base * self.profile(p0, p1) * np.maximum(1.0 + e, 0.05)  # [p, node]
            factor = self.incident_factor(p0, p1)  # [p, node]
            if history is None:  # the very start of the burn-in: no upstream history yet
                history = factor[:lag] * own[:lag]
            # buf = [history; this sub-block]. With lag L, rows [t, t+L) depend only on rows
            # [t-L, t), so the diffusion advances L rows at a time.
            buf = np.concatenate([history, np.empty_like(own)])  # [lag + p, node]
            for t in range(lag, lag + p1 - p0, lag):
                u = min(t + lag, lag + p1 - p0)
                upstream = np.add.reduceat(
                    buf[t - lag : u - lag, self._nbr] * self._nbr_weight, self._indptr[:-1], axis=1
                )  # [<=lag, node]: weighted mean of the neighbours' flow `lag` steps ago
                buf[t:u] = factor[t - lag : u - lag] * (
                    (1 - a) * own[t - lag : u - lag] + a * upstream
                )
            history = buf[-lag:]
            if p0 >= t0:  # sub-blocks are either all burn-in or all output
                self._channels(out[p0 - t0 : p1 - t0], buf[lag:], 1.0 - factor, p0, p1)
        out[~self.observed(t0, t1)] = np.nan  # every channel of a missing reading
        return out

    def _channels(
        self, out: np.ndarray, flow: np.ndarray, jam: np.ndarray, t0: int, t1: int
    ) -> None:
        """Fill ``out`` [step, node, channel] from flow and jam (1 - incident factor)."""
        spec = self.spec
        speed = self._speed(flow, jam, t0, t1) if set(spec.channels) - {"flow"} else None
        for c, name in enumerate(spec.channels):
            if name == "flow":
                out[..., c] = flow
            elif name == "speed":
                out[..., c] = speed
            else:  # occupancy grows with density (flow / speed) and with queues
                assert name == "occupancy" and speed is not None
                per_5min = flow * (5.0 / spec.step_minutes)
                out[..., c] = np.clip(0.0172 * per_5min / speed + 0.35 * jam, 0.0, 1.0)

    # -- pieces ------------------------------------------------------------------------------
    def profile(self, t0: int, t1: int) -> np.ndarray:
        """Daily/weekly demand profile ``[step, node]`` (about 1 at the weekday peaks)."""
        spec = self.spec
        start_ns = pd.Timestamp(spec.start).value
        t_ns = start_ns + np.arange(t0, t1, dtype=np.int64) * spec.step.value
        day, tod_ns = np.divmod(t_ns, _DAY.value)
        hour = (tod_ns / 3.6e12)[:, None]  # [step, 1]
        weekend = ((day + 3) % 7 >= 5)[:, None]  # 1970-01-01 was a Thursday (Monday = 0)

        def bump(centre: np.ndarray | float, width: float) -> np.ndarray:
            d = (hour - centre + 12.0) % 24.0 - 12.0
            return np.exp(-0.5 * (d / width) ** 2)

        am = bump(7.75 + self.shift, 1.0)
        pm = bump(17.25 + self.shift, 1.3)
        weekday = self.night + self.am * am + self.pm * pm + self.midday * bump(13.0, 3.0)
        rest = (
            self.night + 0.25 * self.am * am + 0.3 * self.pm * pm + self.weekend * bump(13.5, 3.2)
        )
        return np.where(weekend, rest, weekday)

    def incidents(self, t0: int, t1: int) -> Events:
        """Incidents overlapping steps ``[t0, t1)`` (at the incident node itself)."""
        return self._events(_INCIDENT, self.spec.incident_rate, INCIDENT_MINUTES, t0, t1)

    def outages(self, t0: int, t1: int) -> Events:
        """Sensor outages overlapping steps ``[t0, t1)``."""
        return self._events(_OUTAGE, self.spec.outage_rate, OUTAGE_MINUTES, t0, t1)

    def neighbours(self, i: int) -> np.ndarray:
        """Indices of the neighbours of node ``i`` (itself excluded)."""
        return self._nbr[self._indptr[i] : self._indptr[i + 1]]

    def incident_factor(self, t0: int, t1: int) -> np.ndarray:
        """Multiplier ``[step, node]`` on flow: 1 - severity during incidents and spill-back."""
        factor = np.ones((t1 - t0, self.spec.nodes))
        delay = self.spec.lag_steps
        # spill-back reaches two hops upstream, 2 * delay later
        events = self.incidents(t0 - 2 * delay, t1)
        for i, a, b, sev in zip(
            events.node, events.start, events.stop, events.severity, strict=True
        ):
            hop1 = self.neighbours(i)
            hop2 = np.setdiff1d(np.concatenate([self.neighbours(j) for j in hop1]), [i, *hop1])
            for nodes, lag, rel in (
                (np.array([i]), 0, 1.0),
                (hop1, 1, SPILLBACK[0]),
                (hop2, 2, SPILLBACK[1]),
            ):
                lo, hi = max(a + lag * delay, t0), min(b + lag * delay, t1)
                if lo < hi:
                    factor[lo - t0 : hi - t0, nodes] *= 1.0 - sev * rel
        return factor

    def observed(self, t0: int, t1: int) -> np.ndarray:
        """``[step, node]`` bool: False during outages and at sporadic missing readings."""
        spec = self.spec
        ok = np.ones((t1 - t0, spec.nodes), dtype=bool)
        out = self.outages(t0, t1)
        for i, a, b in zip(out.node, out.start, out.stop, strict=True):
            ok[max(a, t0) - t0 : min(b, t1) - t0, i] = False
        for u in range(t0 // SUB_BLOCK, -(-t1 // SUB_BLOCK)):
            rng = _rng(spec.seed, _SPORADIC, u)
            count = rng.poisson(spec.sporadic_missing * SUB_BLOCK * spec.nodes)
            t = u * SUB_BLOCK + rng.integers(0, SUB_BLOCK, count)
            node = rng.integers(0, spec.nodes, count)
            keep = (t >= t0) & (t < t1)
            ok[t[keep] - t0, node[keep]] = False
        return ok

    def _speed(self, flow: np.ndarray, jam: np.ndarray, t0: int, t1: int) -> np.ndarray:
        # speed falls slowly with utilisation and sharply in queues
        use = np.clip(flow / (1.25 * self.base), 0.0, 1.5)
        noise = self._normals(_SPEED, t0, t1) * np.float32(1.5)
        speed = self.free_speed * (1 - 0.3 * use**4) * (1 - 0.75 * jam) + noise
        return np.clip(speed, 3.0, 85.0)

    def _normals(self, stream: int, t0: int, t1: int) -> np.ndarray:
        """Standard normals ``[step, node]`` for steps ``[t0, t1)``, fixed per sub-block."""
        u0, u1 = t0 // SUB_BLOCK, -(-t1 // SUB_BLOCK)
        parts = [
            _rng(self.spec.seed, stream, u).standard_normal(
                (SUB_BLOCK, self.spec.nodes), dtype=np.float32
            )
            for u in range(u0, u1)
        ]
        return np.concatenate(parts)[t0 - u0 * SUB_BLOCK : t1 - u0 * SUB_BLOCK]

    def _events(
        self, stream: int, per_day: float, minutes: tuple[float, float], t0: int, t1: int
    ) -> Events:
        spec = self.spec
        steps_per_day = _DAY / spec.step
        longest = math.ceil(minutes[1] / spec.step_minutes)
        nodes, starts, stops, sevs = [], [], [], []
        # an event starting up to `longest` steps before t0 may still be going on
        for u in range((t0 - longest) // SUB_BLOCK, -(-t1 // SUB_BLOCK)):
            rng = _rng(spec.seed, stream, u)
            count = rng.poisson(per_day * spec.nodes * SUB_BLOCK / steps_per_day)
            node = rng.integers(0, spec.nodes, count)
            start = u * SUB_BLOCK + rng.integers(0, SUB_BLOCK, count)
            # log-uniform durations: many short events, a few long ones
            log_minutes = rng.uniform(math.log(minutes[0]), math.log(minutes[1]), count)
            length = np.maximum(1, np.round(np.exp(log_minutes) / spec.step_minutes))
            severity = rng.uniform(*INCIDENT_SEVERITY, count)
            nodes.append(node)
            starts.append(start)
            stops.append(start + length.astype(np.int64))
            sevs.append(severity)
        ev = Events(*(np.concatenate(x) for x in (nodes, starts, stops, sevs)))
        keep = (ev.start < t1) & (ev.stop > t0)
        return Events(ev.node[keep], ev.start[keep], ev.stop[keep], ev.severity[keep])
