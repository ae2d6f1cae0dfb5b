"""SynthSpec: validation names the option and the rule; derived quantities."""

from __future__ import annotations

import math

import pytest

from stkd_dist.errors import ConfigError
from stkd_dist.synth import SynthSpec


@pytest.mark.parametrize(
    ("kwargs", "where", "words"),
    [
        ({"nodes": 1}, "--nodes", "between 2 and"),
        ({"nodes": 2.5}, "--nodes", "integer"),
        ({"steps": 0}, "--steps", "at least 1"),
        ({"seed": -1}, "--seed", "between 0"),
        ({"freq": "2D"}, "--freq", "between"),
        ({"freq": "30s"}, "--freq", "between"),
        ({"freq": "MS"}, "--freq", "fixed frequency"),
        ({"freq": "bogus"}, "--freq", "fixed frequency"),
        ({"start": "not a date"}, "--start", "not a timestamp"),
        ({"start": "2024-01-01T00:00+02:00"}, "--start", "naive"),
        ({"channels": ("flow", "volume")}, "--channels", "unknown channel 'volume'"),
        ({"channels": ("flow", "flow")}, "--channels", "repeat"),
        ({"channels": ()}, "--channels", "at least one"),
        ({"diffusion": 1.5}, "diffusion", "between 0 and 0.9"),
        ({"sporadic_missing": -0.1}, "sporadic_missing", "between"),
    ],
)
def test_invalid_spec_names_field_and_rule(kwargs, where, words):
    args = {"nodes": 10, "steps": 100, **kwargs}
    with pytest.raises(ConfigError) as e:
        SynthSpec(**args)
    assert e.value.where == where
    assert words in e.value.message


def test_json_round_trip_and_start_normalisation():
    a = SynthSpec(nodes=5, steps=10, start="2024-03-04", channels=["flow", "speed"])
    b = SynthSpec(nodes=5, steps=10, start="2024-03-04 00:00:00", channels=("flow", "speed"))
    assert a == b
    assert SynthSpec.from_json(a.to_json()) == a
    assert a.to_json()["channels"] == ["flow", "speed"]


def test_derived_quantities_follow_the_step_length():
    five = SynthSpec(nodes=5, steps=10, freq="5min")
    fifteen = SynthSpec(nodes=5, steps=10, freq="15min")
    assert five.lag_steps == 2 and fifteen.lag_steps == 1
    # the noise decays per minute, not per step
    assert fifteen.noise_phi == pytest.approx(five.noise_phi**3)
    assert five.noise_phi == pytest.approx(math.exp(-5 / 30))
    assert list(fifteen.time[:2].strftime("%H:%M")) == ["00:00", "00:15"]
    assert len(five.time) == 10
