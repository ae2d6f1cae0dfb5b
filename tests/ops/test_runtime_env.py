"""Runtime environment that `stkd submit` ships: defaults, files, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

import stkd_dist
from stkd_dist.errors import ConfigError
from stkd_dist.ops.runtime_env import (
    DEFAULT_EXCLUDES,
    RuntimeEnvOptions,
    build_runtime_env,
    load_runtime_env_file,
    package_source_dir,
)

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_default_ships_the_package_source_and_excludes_local_state() -> None:
    env = build_runtime_env(RuntimeEnvOptions(), environ={})
    assert env["py_modules"] == [str(Path(stkd_dist.__file__).resolve().parent)]
    assert (Path(env["py_modules"][0]) / "cli.py").is_file()
    assert set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert {".venv", "storage", ".git"} <= set(env["excludes"])
    assert "env_vars" not in env


def test_storage_env_var_passes_through_only_when_set() -> None:
    env = build_runtime_env(RuntimeEnvOptions(), environ={"STKD_STORAGE": "/mnt/shared"})
    assert env["env_vars"] == {"STKD_STORAGE": "/mnt/shared"}
    env = build_runtime_env(RuntimeEnvOptions(), environ={"STKD_STORAGE": ""})
    assert "env_vars" not in env


def test_file_values_win_over_passed_environment(tmp_path: Path) -> None:
    f = write(
        tmp_path / "env.yaml",
        "env_vars:\n  STKD_STORAGE: /nfs/stkd\n  OTHER: '1'\npip: [rich]\n",
    )
    env = build_runtime_env(RuntimeEnvOptions(file=f), environ={"STKD_STORAGE": "/laptop"})
    assert env["env_vars"] == {"STKD_STORAGE": "/nfs/stkd", "OTHER": "1"}
    assert env["pip"] == ["rich"]
    assert env["py_modules"] == [str(package_source_dir())]


def test_file_py_modules_replace_the_shipped_source(tmp_path: Path) -> None:
    mod = tmp_path / "mymod"
    mod.mkdir()
    f = write(tmp_path / "env.yaml", f"py_modules: [{mod}]\nexcludes: ['*.csv']\n")
    env = build_runtime_env(RuntimeEnvOptions(file=f), environ={})
    assert env["py_modules"] == [str(mod)]
    # the user's own excludes come first and the defaults are added once
    assert env["excludes"][0] == "*.csv"
    assert env["excludes"].count(".venv") == 1


def test_working_dir_option_is_absolute_and_overrides_the_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    f = write(tmp_path / "env.yaml", f"working_dir: {a}\n")
    env = build_runtime_env(RuntimeEnvOptions(file=f, working_dir=b), environ={})
    assert env["working_dir"] == str(b.resolve())
    assert ".git" in env["excludes"]


def test_no_ship_source_sends_nothing_to_upload() -> None:
    env = build_runtime_env(RuntimeEnvOptions(ship_source=False), environ={})
    assert env == {}


def test_remote_uris_are_not_checked_locally(tmp_path: Path) -> None:
    f = write(tmp_path / "env.yaml", "working_dir: s3://bucket/stkd.zip\n")
    env = build_runtime_env(RuntimeEnvOptions(file=f, ship_source=False), environ={})
    assert env["working_dir"] == "s3://bucket/stkd.zip"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("pipp: [rich]\n", "unknown runtime environment field(s) pipp"),
        ("- a\n- b\n", "a mapping of fields, got list"),
        ("env_vars: {A: 1}\n", "invalid runtime environment"),
        ("working_dir: /no/such/dir/anywhere\n", "working_dir entry '/no/such/dir/anywhere'"),
        ("env_vars: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_give_one_clear_error_naming_the_file(
    tmp_path: Path, text: str, fragment: str
) -> None:
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        build_runtime_env(RuntimeEnvOptions(file=f), environ={})
    assert fragment in str(err.value)
    assert str(f) in str(err.value)


def test_missing_paths_in_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such runtime environment file"):
        RuntimeEnvOptions(file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="working directory does not exist"):
        RuntimeEnvOptions(working_dir=tmp_path / "nope")


def test_empty_file_is_an_empty_environment(tmp_path: Path) -> None:
    assert load_runtime_env_file(write(tmp_path / "e.yaml", "# nothing\n")) == {}


def test_the_shipped_example_file_is_valid() -> None:
    env = load_runtime_env_file(REPO / "cluster" / "runtime_env.yaml")
    assert env["env_vars"]["STKD_STORAGE"].startswith("/")
