"""Unit tests of the sweep's search space: parsing, validation, Tune objects, trial configs."""

from __future__ import annotations

import json

import pytest

from stkd_dist.config import Config, config_from_text, dump_config, load_config
from stkd_dist.config.sweep import ParamSpec, parse_space
from stkd_dist.errors import ConfigError
from stkd_dist.pipeline.tune_space import (
    applied,
    apply_params,
    check_space,
    model_arguments,
    to_tune,
)

SPACE = {
    "distill.alpha": {"uniform": [0.2, 0.9]},
    "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
    "student.model": {"choice": ["mlp", "linear"]},
    "student.kwargs.embed_dim": {"choice": [16, 32, 64]},
}


def cfg_with(space: object, *extra: str):  # type: ignore[no-untyped-def]
    return load_config("demo", [f"sweep.space={json.dumps(space)}", *extra])


def test_space_of_the_documented_example_parses_in_order() -> None:
    cfg = cfg_with(SPACE, "sweep.samples=6", "sweep.max_epochs=4")
    specs = cfg.sweep.params()
    assert [s.key for s in specs] == list(SPACE)
    assert specs[0] == ParamSpec("distill.alpha", "uniform", (0.2, 0.9))
    assert specs[2].candidates == ("mlp", "linear")
    assert cfg.sweep.samples == 6 and cfg.sweep.max_epochs == 4
    # the section survives the dump written to run directories
    assert config_from_text(dump_config(cfg), "dump") == cfg


def test_yaml_exponents_without_a_dot_are_numbers() -> None:
    # YAML 1.1 reads 1e-4 as a string; the bounds are still taken as numbers
    cfg = config_from_text(
        "sweep:\n  space:\n    student.optim.lr: {loguniform: [1e-4, 1e-2]}\n", "x.yaml", "x"
    )
    assert cfg.sweep.params()[0].args == (1e-4, 1e-2)


def test_randint_candidates_exclude_the_upper_bound() -> None:
    (spec,) = parse_space({"student.kwargs.embed_dim": {"randint": [8, 33]}}, schema=Config)
    assert spec.candidates == (8, 32)


@pytest.mark.parametrize(
    ("space", "where", "needle"),
    [
        ({"distill.alpah": {"uniform": [0.2, 0.9]}}, "distill.alpah", "did you mean 'alpha'"),
        ({"distill.alpha": {"unifrm": [0.2, 0.9]}}, "distill.alpha", "did you mean 'uniform'"),
        ({"distill.alpha": {"uniform": [0.9, 0.2]}}, "distill.alpha", "low < high"),
        ({"distill.alpha": {"uniform": [0.2]}}, "distill.alpha", "takes [low, high]"),
        ({"distill.alpha": [0.2, 0.9]}, "distill.alpha", "expected one distribution"),
        ({"student.optim.lr": {"loguniform": [0, 1]}}, "student.optim.lr", "low must be > 0"),
        ({"distill.beta": {"quniform": [0, 1, 0]}}, "distill.beta", "q must be > 0"),
        ({"student.kwargs.embed_dim": {"randint": [8.5, 32]}}, "embed_dim", "integers"),
        ({"student.model": {"choice": []}}, "student.model", "at least one value"),
        ({"student.model": {"choice": ["mlp", "mlp"]}}, "student.model", "listed twice"),
        ({"student.model": {"choice": [1, 2]}}, "student.model", "expected str"),
        ({"student.schedule.epochs": {"uniform": [1, 4]}}, "epochs", "use randint"),
        ({"teacher.optim.lr": {"uniform": [0.1, 0.2]}}, "teacher.optim.lr", "cannot be swept"),
        ({"data.input_steps": {"choice": [6, 12]}}, "data.input_steps", "cannot be swept"),
        (
            {"student.kwargs": {"choice": [1]}, "student.kwargs.a": {"choice": [1]}},
            "student.kwargs",
            "",
        ),
    ],
)
def test_bad_spaces_name_the_key_and_the_rule(space: dict, where: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_with(space)
    assert e.value.where is not None and "sweep.space." in e.value.where
    assert where in e.value.where
    assert needle in e.value.message


def test_section_ranges_are_checked() -> None:
    with pytest.raises(ConfigError, match="grace_period") as e:
        cfg_with(SPACE, "sweep.max_epochs=2", "sweep.grace_period=3")
    assert "must be <= max_epochs" in e.value.message
    with pytest.raises(ConfigError, match="reduction_factor"):
        cfg_with(SPACE, "sweep.reduction_factor=1")
    with pytest.raises(ConfigError, match=r"sweep\.samples"):
        cfg_with(SPACE, "sweep.samples=0")


def test_check_space_validates_each_bound_against_the_whole_config() -> None:
    assert len(check_space(cfg_with(SPACE))) == 4
    bad = [
        ({"distill.alpha": {"uniform": [0.2, 1.5]}}, "1.5", "must be in [0, 1]"),
        ({"student.model": {"choice": ["mlp", "stgnn"]}}, "", "not a student model"),
        ({"student.kwargs.foo": {"choice": [1]}}, "", "takes the argument 'foo'"),
        ({"student.kwargs.embed_dim": {"choice": [0, 8]}}, "0", "embed_dim"),
        ({"distill.loss": {"choice": ["regression", "nope"]}}, "'nope'", "unknown"),
    ]
    for space, value, needle in bad:
        with pytest.raises(ConfigError) as e:
            check_space(cfg_with(space))
        key = next(iter(space))
        assert e.value.where == f"sweep.space.{key}", e.value
        assert value in e.value.message and needle in e.value.message, e.value


def test_to_tune_builds_the_named_distributions() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    specs = parse_space(
        {
            "distill.alpha": {"uniform": [0.2, 0.9]},
            "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
            "distill.beta": {"quniform": [0.0, 1.0, 0.25]},
            "student.kwargs.embed_dim": {"randint": [8, 33]},
            "student.kwargs.node_dim": {"lograndint": [4, 17]},
            "student.model": {"choice": ["mlp", "linear"]},
            "distill.task": {"grid": ["mae", "mse"]},
        }
    )
    space = to_tune(specs)
    assert isinstance(space["distill.alpha"], Float)
    assert (space["distill.alpha"].lower, space["distill.alpha"].upper) == (0.2, 0.9)
    assert isinstance(space["student.optim.lr"].sampler, Float._LogUniform)
    assert space["distill.beta"].sampler.q == 0.25
    assert isinstance(space["student.kwargs.embed_dim"], Integer)
    assert isinstance(space["student.kwargs.node_dim"].get_sampler(), Integer._LogUniform)
    assert isinstance(space["student.model"], Categorical)
    assert space["distill.task"] == {"grid_search": ["mae", "mse"]}
    for _ in range(20):  # draws stay inside the bounds
        assert 0.2 <= space["distill.alpha"].sample() <= 0.9
        assert 8 <= space["student.kwargs.embed_dim"].sample() < 33


def test_apply_params_sets_values_and_drops_other_models_arguments() -> None:
    cfg = cfg_with(SPACE)
    specs = cfg.sweep.params()
    params = {
        "distill.alpha": 0.3,
        "student.optim.lr": 5e-3,
        "student.model": "linear",
        "student.kwargs.embed_dim": 32,
    }
    trial = apply_params(cfg, params)
    assert trial.distill.alpha == 0.3 and trial.student.optim.lr == 5e-3
    assert trial.student.model == "linear" and "embed_dim" not in trial.student.kwargs
    assert "embed_dim" not in (model_arguments("linear") or set())
    assert applied(trial, params, specs)["student.kwargs.embed_dim"] is None

    # the config's own kwargs (the demo's mlp settings) are kept only where the model takes them
    base = load_config("demo").student
    assert base.model == "mlp" and base.kwargs["node_dim"] == 8
    assert apply_params(cfg, {"student.model": "linear"}).student.kwargs == {}
    assert apply_params(cfg, {"student.model": "mlp"}).student.kwargs == base.kwargs

    mlp = apply_params(cfg, {**params, "student.model": "mlp"})
    assert mlp.student.kwargs == {**base.kwargs, "embed_dim": 32}
    assert applied(mlp, {**params, "student.model": "mlp"}, specs)["student.kwargs.embed_dim"] == 32
    # everything not swept is the base config's
    assert mlp.teacher == cfg.teacher and mlp.data == cfg.data and cfg.distill.alpha == 0.5


def test_apply_params_refuses_out_of_range_values() -> None:
    cfg = cfg_with(SPACE)
    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        apply_params(cfg, {"distill.alpha": 1.2})
    with pytest.raises(ConfigError, match="expected float"):
        apply_params(cfg, {"student.optim.lr": "fast"})


def test_expected_trials_multiply_samples_by_the_grid() -> None:
    from stkd_dist.pipeline.sweep import expected_trials

    specs = parse_space(
        {
            "distill.alpha": {"grid": [0.2, 0.5, 0.8]},
            "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
            "student.kwargs.embed_dim": {"grid": [8, 16]},
        },
        schema=Config,
    )
    cfg = config_from_text("sweep: {samples: 2}\n", "sweep.yaml")
    assert expected_trials(cfg, specs) == 2 * 3 * 2
    assert expected_trials(cfg, ()) == 2
