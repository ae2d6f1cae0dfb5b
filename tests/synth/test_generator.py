"""The synthetic traffic process: determinism, block independence, and the structure it must have
(daily cycle, weaker weekends, neighbours' past predicts the future, incidents, missing data)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stkd_dist.synth import BLOCK_STEPS, SynthSpec, TrafficModel

WEEK = 2016  # steps at 5 min


def _series(model: TrafficModel) -> np.ndarray:
    return np.concatenate([model.block(k) for k in range(model.n_blocks)])


@pytest.fixture(scope="module")
def four_weeks() -> tuple[TrafficModel, np.ndarray]:
    model = TrafficModel(SynthSpec(nodes=40, steps=4 * WEEK, seed=3))
    return model, _series(model)  # [time, node, 1]


def test_same_spec_same_values_other_seed_other_values():
    spec = SynthSpec(nodes=12, steps=600, seed=1)
    a, b = TrafficModel(spec).block(0), TrafficModel(spec).block(0)
    assert np.array_equal(a, b, equal_nan=True)
    c = TrafficModel(dataclasses.replace(spec, seed=2)).block(0)
    assert not np.allclose(a, c, equal_nan=True)
    assert a.shape == (600, 12, 1) and a.dtype == np.float32


def test_values_do_not_depend_on_the_number_of_steps():
    short = _series(TrafficModel(SynthSpec(nodes=10, steps=BLOCK_STEPS + 100, seed=4)))
    long = _series(TrafficModel(SynthSpec(nodes=10, steps=2 * BLOCK_STEPS + 7, seed=4)))
    assert np.array_equal(short, long[: short.shape[0]], equal_nan=True)


def test_independent_blocks_equal_one_uninterrupted_run():
    model = TrafficModel(SynthSpec(nodes=15, steps=2 * BLOCK_STEPS, seed=5))
    blocks = _series(model)
    # one pass over both blocks with the state carried across the boundary
    continuous = model.generate(0, 2 * BLOCK_STEPS)
    np.testing.assert_allclose(blocks, continuous, rtol=1e-6, equal_nan=True)
    # a longer burn-in does not change a block either
    longer = model.generate(BLOCK_STEPS, 2 * BLOCK_STEPS, burn_in=3 * model.burn_in)
    np.testing.assert_allclose(blocks[BLOCK_STEPS:], longer, rtol=1e-6, equal_nan=True)


def _autocorrelation(x: np.ndarray, lag: int) -> float:
    a, b = x[:-lag], x[lag:]
    values = []
    for i in range(x.shape[1]):
        ok = ~np.isnan(a[:, i]) & ~np.isnan(b[:, i])
        values.append(np.corrcoef(a[ok, i], b[ok, i])[0, 1])
    return float(np.mean(values))


def test_daily_cycle(four_weeks):
    _, x = four_weeks
    flow = x[..., 0]
    assert _autocorrelation(flow, 288) > 0.6  # one day later: alike
    assert _autocorrelation(flow, 144) < 0.0  # half a day later (peak vs night): opposite
    hour = (np.arange(flow.shape[0]) % 288) / 12
    night, rush = (hour >= 2) & (hour < 4), (hour >= 7) & (hour < 9)
    assert np.nanmean(flow[rush]) > 3 * np.nanmean(flow[night])


def test_weekends_are_quieter_at_rush_hour(four_weeks):
    _, x = four_weeks
    flow = x[..., 0]
    step = np.arange(flow.shape[0])
    hour, day = (step % 288) / 12, step // 288  # 2024-01-01 is a Monday
    rush = (hour >= 7) & (hour < 9)
    weekday, weekend = rush & (day % 7 < 5), rush & (day % 7 >= 5)
    assert np.nanmean(flow[weekend]) < 0.7 * np.nanmean(flow[weekday])


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_neighbours_past_predicts_a_node_better_than_non_neighbours(four_weeks):
    model, x = four_weeks
    lag = model.spec.lag_steps
    # the profile repeats every week: the weekly difference leaves noise, diffusion, incidents
    r = x[WEEK:, :, 0] - x[:-WEEK, :, 0]
    adj = model.graph.adjacency > 0
    rng = np.random.default_rng(0)
    near, far = [], []
    for i in range(model.spec.nodes):
        nbr = np.nonzero(adj[i])[0]
        nbr = nbr[nbr != i]
        others = np.nonzero(~adj[i])[0]
        others = rng.choice(others, size=len(nbr), replace=len(others) < len(nbr))
        y = r[lag:, i]
        for group, out in ((nbr, near), (others, far)):
            z = np.nanmean(r[:-lag, group], axis=1)  # neighbour mean `lag` steps earlier
            ok = ~np.isnan(y) & ~np.isnan(z)
            out.append(np.corrcoef(y[ok], z[ok])[0, 1])
    near, far = np.array(near), np.array(far)
    assert np.mean(near) > np.mean(far) + 0.2
    assert np.mean(near > far) > 0.9


def test_missing_readings_are_plausible_and_cover_outages(four_weeks):
    model, x = four_weeks
    missing = np.isnan(x)
    assert 0.002 < missing.mean() < 0.05
    # a missing reading is missing in every channel, never partly
    assert np.array_equal(missing.any(-1), missing.all(-1))
    outages = model.outages(0, x.shape[0])
    assert len(outages) > 0
    for i, a, b in zip(outages.node, outages.start, outages.stop, strict=True):
        assert missing[max(a, 0) : b, i].all()
    # sporadic single readings go missing too, outside outages
    in_outage = np.zeros(missing.shape[:2], dtype=bool)
    for i, a, b in zip(outages.node, outages.start, outages.stop, strict=True):
        in_outage[max(a, 0) : b, i] = True
    assert (missing[..., 0] & ~in_outage).sum() > 0


def test_incidents_cut_flow_at_the_node_and_upstream():
    spec = SynthSpec(nodes=30, steps=WEEK, seed=7, incident_rate=0.3, outage_rate=0.0)
    with_incidents = TrafficModel(spec)
    calm = TrafficModel(dataclasses.replace(spec, incident_rate=0.0))
    x, y = with_incidents.block(0)[..., 0], calm.block(0)[..., 0]
    ratio = x / y
    events = with_incidents.incidents(0, WEEK)
    assert len(events) > 10
    lag = spec.lag_steps
    for i, a, b, sev in zip(events.node, events.start, events.stop, events.severity, strict=True):
        at = ratio[max(a, 0) : b, i]
        assert np.nanmax(at) <= 1 - sev + 1e-4
        for j in with_incidents.neighbours(i):
            up = ratio[max(a + lag, 0) : b + lag, j]
            if up.size:
                assert np.nanmax(up) <= 1 - 0.5 * sev + 1e-4
    # incidents only ever take flow away, and they are rare events
    assert np.nanmax(ratio) <= 1 + 1e-5
    assert np.nanmean(ratio) > 0.9


def test_extra_channels_leave_flow_unchanged_and_react_to_incidents():
    spec = SynthSpec(nodes=20, steps=WEEK, seed=8, incident_rate=0.3)
    flow_only = TrafficModel(spec).block(0)
    model = TrafficModel(dataclasses.replace(spec, channels=("speed", "flow", "occupancy")))
    x = model.block(0)
    assert np.array_equal(x[..., 1], flow_only[..., 0], equal_nan=True)
    speed, occupancy = x[..., 0], x[..., 2]
    assert np.nanmin(occupancy) >= 0 and np.nanmax(occupancy) <= 1
    assert 55 < np.nanmedian(speed) < 75
    jam = np.zeros(speed.shape, dtype=bool)
    events = model.incidents(0, WEEK)
    for i, a, b in zip(events.node, events.start, events.stop, strict=True):
        jam[max(a, 0) : b, i] = True
    assert np.nanmean(speed[jam]) < 0.8 * np.nanmean(speed[~jam])
    assert np.nanmean(occupancy[jam]) > np.nanmean(occupancy[~jam])


def test_other_step_lengths_keep_the_daily_cycle():
    model = TrafficModel(SynthSpec(nodes=10, steps=96 * 14, freq="15min", seed=2))
    flow = _series(model)[..., 0]
    assert _autocorrelation(flow, 96) > 0.6
    assert _autocorrelation(flow, 48) < 0.0
    # flow is per step: a 15-min step counts about three times the vehicles of a 5-min one
    five = _series(TrafficModel(SynthSpec(nodes=10, steps=288 * 14, seed=2)))[..., 0]
    assert np.nanmean(flow) / np.nanmean(five) == pytest.approx(3, rel=0.1)


def test_demo_dynamics_defeat_the_time_of_week_mean() -> None:
    """The embedded default is made so that the weekly profile alone forecasts badly.

    Share of the variance of the flow left unexplained by the per-node time-of-week mean of the
    first two weeks, measured on the next two: with the demo's dynamics it is several times
    larger than with the generator's defaults.
    """
    from stkd_dist.pipeline.stages import DEMO_DYNAMICS, demo_spec

    def unexplained(spec: SynthSpec) -> float:
        model = TrafficModel(spec)
        x = np.concatenate([model.block(k) for k in range(model.n_blocks)])[..., 0]
        fit, test = x[: 2 * BLOCK_STEPS], x[2 * BLOCK_STEPS :]
        profile = np.nanmean(fit.reshape(2, BLOCK_STEPS, -1), axis=0)
        resid = test - np.concatenate([profile, profile])[: len(test)]
        return float(np.nanvar(resid) / np.nanvar(test))

    spec = demo_spec()
    assert {k: getattr(spec, k) for k in DEMO_DYNAMICS} == DEMO_DYNAMICS
    default = SynthSpec(nodes=spec.nodes, steps=spec.steps, seed=spec.seed)
    assert unexplained(spec) > 3 * unexplained(default)
