"""``stkd serve`` and ``stkd precompute-labels`` argument handling (one-line errors, help)."""

from __future__ import annotations

import pytest
import torch

from stkd_dist.cli import main

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the errors of a machine without CUDA"
)


@pytest.mark.parametrize("command", ["serve", "precompute-labels"])
def test_help_has_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"stkd {command} --checkpoint" in out


@pytest.mark.parametrize(
    ("extra", "where", "words"),
    [
        (["--write-through"], "--write-through", "--cache"),
        (["--tls-cert", "c.pem"], "--tls-cert", "both"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca", "--tls-cert"),
        (["--cache", "nowhere.zarr"], "nowhere.zarr", "no label cache"),
        (["--cache-memory-mb", "-1", "--cache", "auto"], "--cache-memory-mb", ">= 0"),
        (["--cache-hidden", "--cache", "auto"], "--cache-hidden", "--write-through"),
    ],
)
def test_serve_errors_are_one_line(teacher_env, capsys, extra, where, words) -> None:
    argv = ["serve", "--checkpoint", str(teacher_env.checkpoint), "--data", str(teacher_env.store)]
    assert main([*argv, "--port", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"stkd: error: {where}") and words in err


def test_serve_refuses_another_dataset(teacher_env, make_store, capsys) -> None:
    other = make_store("other")
    argv = ["serve", "--checkpoint", str(teacher_env.checkpoint), "--data", str(other)]
    assert main([*argv, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "stkd: error:" in err and "fingerprint" in err and "Traceback" not in err


def test_serve_help_mentions_the_compute_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--device", "--precision", "--micro-batch", "auto", "bf16", "fp16"):
        assert flag in out


@pytest.mark.parametrize(
    ("extra", "where", "words"),
    [
        (["--precision", "fp16"], "--precision", "needs a CUDA device"),
        (["--micro-batch", "0"], "--micro-batch", "> 0"),
        (["--device", "npu"], "--device", "auto, cpu, cuda"),
        pytest.param(
            ["--device", "cuda"], "--device", "torch.cuda.is_available() is False", marks=no_cuda
        ),
    ],
)
def test_serve_compute_errors_are_one_line(teacher_env, capsys, extra, where, words) -> None:
    argv = ["serve", "--checkpoint", str(teacher_env.checkpoint), "--data", str(teacher_env.store)]
    assert main([*argv, "--port", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"stkd: error: {where}") and words in err


def test_precompute_labels_with_hidden_states(teacher_env, tmp_path, capsys) -> None:
    from stkd_dist.serving.cache import LabelCache

    out = tmp_path / "h.zarr"
    argv = ["precompute-labels", "--checkpoint", str(teacher_env.checkpoint)]
    argv += ["--data", str(teacher_env.store), "--splits", "val", "--out", str(out), "--hidden"]
    assert main(argv) == 0
    assert "hidden states  [5, 8] per window" in capsys.readouterr().out
    assert LabelCache(out).hidden_dim == 8
