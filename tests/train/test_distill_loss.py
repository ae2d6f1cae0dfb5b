"""A distilled rank's loss on one process: a batch of padding only asks no teacher.

A rank whose windows of the epoch ran out keeps stepping with the others on padding; a resumed
epoch's stream may not have sent a single label yet, so such a batch must not wait on (or take its
shape from) the teachers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stkd_dist.config import load_config
from stkd_dist.data.loader import make_loader
from stkd_dist.labels.sources import Labels
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, resolve_teachers
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.teacher import load_teacher
from stkd_dist.storage import open_store
from stkd_dist.train.distill_loss import DistillLoss
from stkd_dist.train.loop import WorkerContext, build_reader
from tests.train.student_env import Env


class _Asked:
    """A label source that records the batches it is asked for (and answers from the real one)."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.asked: list[torch.Tensor] = []

    def labels_for(self, index: torch.Tensor, valid: torch.Tensor) -> Labels:
        self.asked.append(valid.clone())
        return self.real.labels_for(index, valid)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


def test_a_batch_of_padding_only_asks_no_teacher_and_adds_no_weight(
    env: Env, tmp_path: Path
) -> None:
    cfg = load_config(env.config, ["run.name=padding-unit"])
    store = open_store(env.store)
    reader = build_reader(cfg, store)
    dims = reader.dims
    cache = precompute_labels(
        load_teacher(env.ckpt["a"], env.store), tmp_path / "l.zarr", ["train"]
    )
    teachers = resolve_teachers(
        (TeacherSpec("cache", str(cache.path)),),
        fingerprint=store.fingerprint,
        window_shape=(dims.horizon, dims.nodes, dims.out_channels),
        windows=reader.windows("train"),
    )
    spec = LabelSpec(teachers, store.fingerprint)
    ctx = WorkerContext(cfg, reader, store, 0, 1, torch.device("cpu"))
    loss_fn = DistillLoss(ctx, spec, str(tmp_path / "exp"))
    asked = _Asked(loss_fn.source)
    loss_fn.source = asked  # type: ignore[assignment]
    batch = next(iter(make_loader(reader, "train", 1, 0, epoch=0, seed=0, batch_size=4)))
    pred = torch.randn(batch.y.shape, requires_grad=True)  # [B, H, N, C]

    padding = batch._replace(valid=torch.zeros_like(batch.valid))
    value = loss_fn(padding, pred)
    assert asked.asked == []  # no teacher was asked
    assert float(value.weight) == 0.0 and torch.isfinite(value.mean)
    value.mean.backward()  # the step still runs (DDP's all-reduce needs it on every rank)
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0

    value = loss_fn(batch, pred)  # real samples still come from the teacher
    assert len(asked.asked) == 1 and bool(asked.asked[0].all())
    assert float(value.weight) == batch.valid.sum() * dims.horizon * dims.nodes * dims.out_channels
    loss_fn.close()
