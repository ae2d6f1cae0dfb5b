"""Config loading: presets, typed validation, error messages, ``--set`` overrides, round trips."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from stkd_dist.commands._common import add_config_args, config_from_args
from stkd_dist.config import (
    Config,
    config_from_text,
    dump_config,
    load_config,
    preset_names,
    write_config,
)
from stkd_dist.config.loader import read_config
from stkd_dist.config.validate import validate_config
from stkd_dist.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtin_presets_exist_load_and_validate() -> None:
    names = preset_names()
    assert {"demo", "los-loop", "pems08-prefix"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.run_name == name  # run name defaults to the preset name
        validate_config(cfg)  # models build with their kwargs, the loss exists
    pems = load_config("pems08-prefix")
    assert pems.data.input_channels == ("flow", "occupancy", "speed")
    assert pems.data.target_channels == ("flow",)
    los = load_config("los-loop")
    assert (los.data.dataset, los.data.input_steps, los.teacher.model, los.student.model) == (
        "los-loop",
        12,
        "stgnn",  # each real dataset's measured better teacher (bench/RESULTS.md)
        "mlp",
    )
    assert pems.teacher.model == "staeformer"


def test_file_values_defaults_and_run_name_from_stem(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "data: {dataset: mine, horizon: 3}\nteacher: {optim: {lr: 3e-4}}\ncluster: {num_workers: 1}\n",
        "my-exp.yaml",
    )
    cfg = load_config(p)
    assert cfg.run_name == "my-exp"
    assert cfg.data.dataset == "mine" and cfg.data.horizon == 3
    assert cfg.data.input_steps == 12  # default kept
    assert cfg.teacher.model == "stgnn"  # role default when the file names no model
    assert cfg.teacher.optim.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string
    assert cfg.cluster.num_workers == 1
    assert cfg.data.window().horizon == 3 and cfg.data.splits().train == pytest.approx(0.7)


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, "teacher:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    assert str(p) in text
    assert "teacher.optim.lrr" in text
    assert "did you mean 'lr'?" in text

    p = write(tmp_path, "dataa: {dataset: x}\n", "top.yaml")
    with pytest.raises(
        ConfigError, match=r"top.yaml: dataa: unknown key 'dataa'.*did you mean 'data'"
    ):
        load_config(p)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("data: {batch_size: 1.5}", "data.batch_size", "expected int"),
        ("data: {batch_size: true}", "data.batch_size", "expected int"),
        ("teacher: {optim: {lr: fast}}", "teacher.optim.lr", "expected float"),
        ("cluster: {use_gpu: 1}", "cluster.use_gpu", "expected bool"),
        ("teacher: {schedule: {kind: linear}}", "teacher.schedule.kind", "one of 'cosine'"),
        ("data: {input_channels: speed}", "data.input_channels", "list of str"),
        ("teacher: {kwargs: [1, 2]}", "teacher.kwargs", "expected mapping"),
        ("data: 3", "data", "expected mapping"),
    ],
)
def test_type_errors_say_the_expected_type(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    p = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: {key}:" in str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size: must be > 0"),
        ("data.split.train=0.6", "data.split: train + val + test must sum to 1"),
        ("cluster.num_workers=-1", "cluster.num_workers: must be > 0"),
        ("cluster.num_workers={min: 3, max: 2}", "cluster.num_workers.min: must be <= max (2)"),
        ("cluster.num_workers={max: 2}", "cluster.num_workers.min: must be > 0"),
        ("cluster.num_workers={min: 1, max: 2, step: 1}", "unknown key 'step'"),
        ("checkpoint.upload=later", "checkpoint.upload: expected one of 'async', 'sync'"),
        ("run.name=a/b", "run.name:"),
        ("teacher.optim.betas=[0.9, 1.5]", "teacher.optim.betas"),
        ("data.input_channels=[a, a]", "lists channel(s) twice: a"),
    ],
)
def test_range_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert message in str(e.value)


def test_set_overrides_apply_with_types() -> None:
    cfg = load_config(
        "demo",
        [
            "teacher.optim.lr=3e-4",
            "data.split.train=0.6",
            "data.split.test=0.3",
            "teacher.kwargs.blocks=2",
            "data.input_channels=[c0]",
            "cluster.address=null",
            "run.name=exp1",
        ],
    )
    assert cfg.teacher.optim.lr == pytest.approx(3e-4)
    assert (cfg.data.split.train, cfg.data.split.test) == (0.6, 0.3)
    assert cfg.teacher.kwargs["blocks"] == 2
    assert cfg.teacher.kwargs["residual_channels"] == 16  # the preset's other kwargs stay
    assert cfg.data.input_channels == ("c0",)
    assert cfg.run_name == "exp1"


def test_set_typos_and_bad_values_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"--set: teacher.optim.lrr: .*did you mean 'lr'"):
        load_config("demo", ["teacher.optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'tacher'.*did you mean 'teacher'"):
        load_config("demo", ["tacher.model=x"])
    with pytest.raises(ConfigError, match=r"--set: teacher.optim.lr: expected float"):
        load_config("demo", ["teacher.optim.lr=abc"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["teacher.optim.lr"])
    with pytest.raises(ConfigError, match="has no key"):
        load_config("demo", ["teacher.model.x=1"])


def test_unknown_preset_suggests_and_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no preset named 'dmeo' \(did you mean 'demo'\?\)"):
        load_config("dmeo")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    bad = write(tmp_path, "data: {dataset: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(bad)


@pytest.mark.parametrize("name", ["demo", "los-loop", "pems08-prefix"])
def test_dump_round_trips(name: str, tmp_path: Path) -> None:
    cfg = load_config(name, ["teacher.kwargs.dropout=0.2", "data.target_channels=[a]"])
    again = config_from_text(dump_config(cfg), "dumped")
    assert again == cfg
    path = write_config(cfg, tmp_path / "run" / "config.yaml")
    assert read_config(path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_model_kwargs_are_checked_against_the_model() -> None:
    cfg = load_config("demo", ["teacher.kwargs.hidden_size=3"])
    with pytest.raises(ConfigError, match="hidden_size") as e:
        validate_config(cfg, roles=("teacher",), distill=False)
    assert "teacher" in str(e.value)
    cfg = load_config("demo", ["student.model=mpl"])
    with pytest.raises(ConfigError, match="mpl"):
        validate_config(cfg, roles=("student",), distill=False)
    cfg = load_config("demo", ["distill.loss=regresion"])
    with pytest.raises(ConfigError, match=r"distill.loss.*did you mean 'regression'"):
        validate_config(cfg, roles=())


def test_common_flags_override_config_and_set() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(
        [
            "--config",
            "demo",
            "--set",
            "cluster.num_workers=3",
            "--set",
            "teacher.optim.lr=0.01",
            "--workers",
            "1",
            "--epochs",
            "7",
            "--data",
            "some/store.zarr",
            "--run-name",
            "r1",
            "--address",
            "ray://head:10001",
        ]
    )
    cfg = config_from_args(args, roles=("teacher",))
    assert cfg.cluster.num_workers == 1  # the flag wins over --set
    assert cfg.teacher.optim.lr == pytest.approx(0.01)
    assert cfg.teacher.schedule.epochs == 7
    assert cfg.student.schedule.epochs == load_config("demo").student.schedule.epochs
    assert cfg.data.dataset == "some/store.zarr"
    assert (cfg.run_name, cfg.cluster.address) == ("r1", "ray://head:10001")
    with pytest.raises(ConfigError, match=r"cluster\.num_workers: must be > 0"):
        config_from_args(parser.parse_args(["--workers", "0"]))
    elastic = config_from_args(parser.parse_args(["--workers", "2-4"])).cluster
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 2, 4)
    with pytest.raises(ConfigError, match=r"cluster\.num_workers\.min: must be <= max \(2\)"):
        config_from_args(parser.parse_args(["--workers", "3-2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "2-x"])


def test_config_defaults_are_a_valid_config() -> None:
    cfg = Config()
    assert yaml.safe_load(dump_config(cfg))["teacher"]["model"] == "stgnn"
    assert cfg.model("student").model == "mlp"
    with pytest.raises(ValueError):
        cfg.model("critic")


def test_distill_settings_are_checked_by_building_the_loss() -> None:
    with pytest.raises(ConfigError, match=r"distill.task: .*'maee'"):
        validate_config(load_config("demo", ["distill.task=maee"]), roles=())
    with pytest.raises(ConfigError, match=r"distill.alpha: must be in \[0, 1\]"):
        load_config("demo", ["distill.alpha=1.5"])
    validate_config(load_config("demo", ["distill.loss=hinton"]), roles=())


def test_elastic_num_workers_round_trips_and_reaches_ray_train() -> None:
    from stkd_dist.config import WorkerRange, config_from_text, dump_config

    cfg = load_config("demo", ["cluster.num_workers={min: 2, max: 4}"])
    c = cfg.cluster
    assert c.num_workers == WorkerRange(2, 4) and c.elastic
    assert (c.min_workers, c.max_workers, c.describe_workers()) == (2, 4, "2-4 (elastic)")
    assert config_from_text(dump_config(cfg), "dumped").cluster == c
    fixed = load_config("demo", ["cluster.num_workers=3"]).cluster
    assert not fixed.elastic and (fixed.min_workers, fixed.max_workers) == (3, 3)
