"""Hint distillation on one process: the student trains with its projection (one module), the
loss parts include ``hint``, the projection is a checkpoint's loss state and never its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stkd_dist.checkpoint import TrainState, load_checkpoint_state, save_checkpoint
from stkd_dist.config import load_config
from stkd_dist.data.loader import make_loader
from stkd_dist.errors import ConfigError
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, resolve_teachers
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.teacher import load_teacher
from stkd_dist.storage import open_store
from stkd_dist.train.hint import HintDistillLoss, HintStudent
from stkd_dist.train.loop import FeatureLoss, WorkerContext, build_model, build_reader, train_epoch
from stkd_dist.train.student import make_distill_loss
from tests.train.student_env import Env


def _setup(env: Env, tmp_path: Path) -> tuple[WorkerContext, LabelSpec]:
    cfg = load_config(env.config, ["run.name=hint-unit", "distill.loss=hint", "distill.beta=1.0"])
    store = open_store(env.store)
    reader = build_reader(cfg, store)
    cache = precompute_labels(
        load_teacher(env.ckpt["a"], env.store), tmp_path / "h.zarr", ["train"], hidden=True
    )
    dims = reader.dims
    teachers = resolve_teachers(
        (TeacherSpec("cache", str(cache.path)),),
        fingerprint=store.fingerprint,
        window_shape=(dims.horizon, dims.nodes, dims.out_channels),
        windows=reader.windows("train"),
        hidden=True,
    )
    spec = LabelSpec(teachers, store.fingerprint, hidden=True)
    return WorkerContext(cfg, reader, store, 0, 1, torch.device("cpu")), spec


def test_a_hint_student_trains_its_projection_and_the_hint_term_falls(
    env: Env, tmp_path: Path
) -> None:
    ctx, spec = _setup(env, tmp_path)
    cfg, reader = ctx.config, ctx.reader
    torch.manual_seed(0)
    model = build_model(cfg.student, reader, ctx.store)
    loss_fn = make_distill_loss(spec, str(tmp_path / "exp"), ctx)
    assert isinstance(loss_fn, HintDistillLoss) and isinstance(loss_fn, FeatureLoss)
    trained = loss_fn.train_module(model)
    assert isinstance(trained, HintStudent)
    # P: F_s (the mlp student's 32) -> F_t (the LSTM teacher's 8)
    assert tuple(trained.projection.weight.shape) == (8, model.hidden_dim()) == (8, 32)
    start = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    student_start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    parts = []
    for epoch in range(3):
        loader = make_loader(reader, "train", 1, 0, epoch=epoch, seed=0, batch_size=16)
        loss_fn.begin_epoch(epoch, loader)
        trained.train()
        train_epoch(trained, loader, loss_fn, optimizer, 5.0, ctx.device, 1)
        parts.append(loss_fn.end_epoch(epoch))
    assert {"train_task", "train_match", "train_hint"} <= parts[0].keys()
    hints = [p["train_hint"] for p in parts]
    assert all(h > 0 for h in hints) and hints[-1] < hints[0], hints
    # the projection and the student were trained, together
    assert not torch.equal(start["weight"], loss_fn.state_dict()["weight"])
    assert any(not torch.equal(student_start[k], v) for k, v in model.state_dict().items())
    # validation reads the forecast through the same module
    batch = next(iter(make_loader(reader, "val", 1, 0, epoch=0, seed=0, batch_size=4)))
    trained.eval()
    with torch.no_grad():
        forecast = trained(batch.x, batch.time_of_day, batch.day_of_week)
        assert torch.equal(forecast, model(batch.x, batch.time_of_day, batch.day_of_week))
    loss_fn.close()


def test_the_projection_is_kept_for_resuming_and_never_in_the_model(
    env: Env, tmp_path: Path
) -> None:
    ctx, spec = _setup(env, tmp_path)
    torch.manual_seed(0)
    model = build_model(ctx.config.student, ctx.reader, ctx.store)
    loss_fn = make_distill_loss(spec, str(tmp_path / "exp"), ctx)
    assert isinstance(loss_fn, HintDistillLoss)
    loss_fn.train_module(model)
    with torch.no_grad():
        loss_fn._projection().weight.add_(1.0)  # not the initial weights any more
    save_checkpoint(
        tmp_path / "ckpt",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=ctx.config,
        fingerprint=ctx.store.fingerprint,
        stats=ctx.reader.stats,
        metrics={},
        state=TrainState(epoch=0),
        loss_state=loss_fn.state_dict(),
    )
    saved = load_checkpoint_state(tmp_path / "ckpt")
    # the exported student is the forecaster alone; the projection travels with the training
    assert not any("projection" in k for k in saved["model"])
    assert set(saved["loss_state"]) == {"weight", "bias"}
    resumed = make_distill_loss(spec, str(tmp_path / "exp2"), ctx)
    assert isinstance(resumed, HintDistillLoss)
    resumed.train_module(build_model(ctx.config.student, ctx.reader, ctx.store))
    resumed.load_state_dict(saved["loss_state"])
    for k, v in loss_fn.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v)
    loss_fn.close()
    resumed.close()


def test_the_hint_loss_needs_a_teacher_with_hidden_states(env: Env, tmp_path: Path) -> None:
    ctx, spec = _setup(env, tmp_path)
    model = build_model(ctx.config.student, ctx.reader, ctx.store)
    with pytest.raises(ConfigError, match="hidden width is 0") as info:
        HintStudent(model, 0)
    assert info.value.where == "distill.loss"
    plain = LabelSpec(spec.teachers, spec.fingerprint)
    with pytest.raises(ConfigError, match="hidden=True"):
        HintDistillLoss(ctx, plain, str(tmp_path / "exp"))


def test_the_hidden_width_is_measured_without_touching_the_training_state(env: Env) -> None:
    cfg = load_config(env.config, ["run.name=hint-dim", "student.kwargs.dropout=0.5"])
    store = open_store(env.store)
    model = build_model(cfg.student, build_reader(cfg, store), store)
    model.train()
    rng = torch.get_rng_state()
    assert model.hidden_dim() == 32  # embed_dim 16 + node_dim 8 + time embeddings 4 + 4
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # no dropout drawn
    assert model.hidden_dim() == 32  # measured once
