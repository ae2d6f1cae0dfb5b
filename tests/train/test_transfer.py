"""A teacher of one network made a teacher of another (``train.transfer``), served for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stkd_dist.checkpoint import TrainState, load_forecaster, save_checkpoint
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.serving.client import LabelMismatchError, SoftLabelClient
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import load_teacher
from stkd_dist.storage import open_store
from stkd_dist.testing import briefly_trained, random_store
from stkd_dist.train.loop import build_model, build_reader
from stkd_dist.train.transfer import transfer_teacher
from tests.train.conftest import tiny_config


def _teacher(root: Path, store: Path, model: str = "stgnn_inductive") -> Path:
    """A briefly trained teacher of ``store`` (a few steps: it forecasts something)."""
    cfg = tiny_config(store, "src", "data.horizon=3", f"teacher.model={model}")
    st = open_store(store)
    reader = build_reader(cfg, st)
    torch.manual_seed(0)
    net = build_model(cfg.teacher, reader, st)
    loss = briefly_trained(net, reader, steps=10)
    info = save_checkpoint(
        root / f"{model}-teacher",
        model_state=net.eval().state_dict(),
        spec=net.spec(),
        config=cfg,
        fingerprint=st.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": loss},
        state=TrainState(epoch=0),
        dataset=st.name,
    )
    return Path(info.path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("transfer")
    source = Path(random_store(root / "source.zarr", nodes=6, seed=0))
    target = Path(random_store(root / "target.zarr", nodes=9, seed=5))  # another network
    return root, source, target


def _serve(checkpoint: Path, store: Path) -> TeacherServer:
    server = TeacherServer(load_teacher(checkpoint, store), ServerConfig(drain_grace_s=1.0))
    server.start()
    return server


@pytest.mark.integration
def test_the_target_is_labelled_only_through_a_transferred_checkpoint(
    stores: tuple[Path, Path, Path],
) -> None:
    root, source, target = stores
    src = _teacher(root, source)
    target_fp = open_store(target).fingerprint
    # the fingerprint rule: the source teacher neither loads for the target...
    with pytest.raises(StoreError, match="trained on the dataset with fingerprint"):
        load_teacher(src, target)
    # ... nor does a server of the source serve the target's windows
    server = _serve(src, source)
    try:
        with (
            SoftLabelClient([server.address], expected_fingerprint=target_fp) as c,
            pytest.raises(LabelMismatchError, match="dataset"),
        ):
            list(c.stream("train", range(5)))
    finally:
        server.stop()

    info = transfer_teacher(src, open_store(target), root / "on-target")
    assert info.fingerprint == target_fp and info.spec["dims"]["nodes"] == 9
    assert info.metrics["transferred_from"]["fingerprint"] == open_store(source).fingerprint
    assert info.val_mae is None  # measured on the source: not claimed for the target

    # served for real: a server of the transferred checkpoint streams the target's labels
    teacher = load_teacher(info.path, target)
    windows = list(teacher.meta.splits["train"])[:40]
    server = _serve(info.path, target)
    try:
        with SoftLabelClient([server.address], expected_fingerprint=target_fp) as c:
            items = list(c.stream("train", windows))
    finally:
        server.stop()
    served = np.concatenate([lab.prediction for _, lab in items])  # [window, H, node, C_out]
    assert served.shape == (40, 3, 9, 2) and np.isfinite(served).all()

    # the reference, built here: the source's weights on the target graph, applied to the
    # target's windows normalised with the target's statistics
    model, _ = load_forecaster(src)
    st = open_store(target)
    reader = build_reader(info.config, st)
    on_target = model.rebound(9, st.adjacency(), reader.target_scale()).eval()
    batch = reader.batch(windows)
    with torch.no_grad():
        expect = on_target(batch.x, batch.time_of_day, batch.day_of_week).numpy()
    np.testing.assert_allclose(served, expect, rtol=1e-5, atol=1e-4)


def test_a_teacher_with_per_node_parameters_or_other_channels_is_refused(
    stores: tuple[Path, Path, Path],
) -> None:
    root, source, target = stores
    with pytest.raises(ConfigError, match="learns per-node parameters") as e:
        transfer_teacher(_teacher(root, source, "stgnn"), open_store(target), root / "x")
    assert e.value.where == "teacher.model"
    one = random_store(root / "one-channel.zarr", nodes=4, channels=1, seed=2)
    with pytest.raises(ConfigError, match="has no channel c1 \\(it has c0\\)") as e:
        transfer_teacher(_teacher(root, source), open_store(one), root / "y")
    assert e.value.where == "data.input_channels"
    assert not (root / "x").exists() and not (root / "y").exists()
