"""Compute settings of a teacher: device and precision checks, ``serve`` keys, CUDA paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stkd_dist.config import from_mapping
from stkd_dist.config.pipeline import ServeSection
from stkd_dist.errors import ConfigError
from stkd_dist.serving.forward import SERVE_KEYS, ComputeSettings, resolve_compute
from stkd_dist.serving.teacher import load_teacher

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available())")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the errors of a machine without CUDA")


def test_auto_is_cuda_when_available_else_the_cpu() -> None:
    compute = resolve_compute("auto")
    assert compute.device_type == ("cuda" if CUDA else "cpu")
    assert compute.precision == "fp32" and compute.micro_batch == 32


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_key(device: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_compute(device, keys=SERVE_KEYS)
    assert str(e.value) == (
        f"serve.device: {device} requested but torch.cuda.is_available() is False"
    )


@pytest.mark.parametrize(
    ("settings", "where", "words"),
    [
        ({"device": "gpu"}, "serve.device", "auto, cpu, cuda or cuda:<index>"),
        ({"device": "cpu", "precision": "fp16"}, "serve.precision", "needs a CUDA device"),
        ({"device": "cpu", "precision": "bf16"}, "serve.precision", "needs a CUDA device"),
        ({"precision": "fp8"}, "serve.precision", "fp32, bf16, fp16"),
        ({"micro_batch": 0}, "serve.micro_batch", "> 0"),
    ],
)
def test_bad_settings_name_the_key(settings: dict, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_compute(**{"device": "cpu", **settings}, keys=SERVE_KEYS)
    assert e.value.where == where and words in e.value.message


@pytest.mark.parametrize(
    ("section", "where", "words"),
    [
        ({"device": "tpu"}, "serve.device", "cuda:<index>"),
        ({"device": "cpu", "precision": "fp16"}, "serve.precision", "needs a CUDA device"),
        ({"precision": "half"}, "serve.precision", "fp16"),
        ({"micro_batch": -4}, "serve.micro_batch", "> 0"),
    ],
)
def test_serve_section_checks_its_compute_keys(section: dict, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping(ServeSection, section, source="run.yaml", prefix="serve")
    assert e.value.where == f"run.yaml: {where}" and words in e.value.message


def test_serve_section_defaults_and_gpu_settings() -> None:
    s = from_mapping(ServeSection, {}, prefix="serve")
    assert (s.device, s.precision, s.micro_batch) == ("cpu", "fp32", 32)
    # CUDA settings load anywhere: the machine that serves checks its device
    gpu = from_mapping(ServeSection, {"device": "cuda:1", "precision": "bf16"}, prefix="serve")
    assert (gpu.device, gpu.precision) == ("cuda:1", "bf16")


def test_settings_are_checked_on_construction_too() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        ComputeSettings("cpu", "bf16")
    with pytest.raises(ConfigError, match="resolve"):
        ComputeSettings("auto")


# -- CUDA --------------------------------------------------------------------------------------
@needs_cuda
def test_teacher_loads_straight_onto_cuda(teacher_env, direct) -> None:
    teacher = load_teacher(teacher_env.checkpoint, teacher_env.store, device="cuda")
    assert teacher.compute.device.startswith("cuda:")
    assert all(p.device.type == "cuda" for p in teacher.model.parameters())
    windows = np.arange(0, 100)
    got, ref = teacher.predict(windows), direct.predict(windows)
    pred, spread, ref_pred, ref_spread = got.prediction, got.spread, ref.prediction, ref.spread
    assert pred.dtype == np.float32 and spread is not None and ref_spread is not None
    # another device's kernels: close, not bitwise
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spread, ref_spread, rtol=1e-4, atol=1e-4)
    again = teacher.predict(windows[::-1]).prediction
    np.testing.assert_allclose(again[::-1], pred, rtol=1e-6, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_precisions(teacher_env, direct, precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    teacher = load_teacher(
        teacher_env.checkpoint, teacher_env.store, device="cuda", precision=precision
    )
    pred = teacher.predict(np.arange(64)).prediction
    assert pred.dtype == np.float32
    np.testing.assert_allclose(pred, direct.predict(np.arange(64)).prediction, rtol=0.05, atol=0.5)


@needs_cuda
def test_a_cuda_server_streams_its_teachers_labels(server_factory, teacher_env) -> None:
    from stkd_dist.serving.client import SoftLabelClient

    server = server_factory(teacher={"device": "cuda"}, batch_size=64)
    local = load_teacher(teacher_env.checkpoint, teacher_env.store, device="cuda")
    windows = list(range(0, 200))
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        pred = np.concatenate([lab.prediction for _, lab in c.stream("train", windows)])
    # the same micro-batches on the same GPU; close rather than bitwise (cuDNN may pick other
    # algorithms in another process)
    np.testing.assert_allclose(pred, local.predict(windows).prediction, rtol=1e-5, atol=1e-5)
    assert server.teacher.forward_windows == len(windows)
