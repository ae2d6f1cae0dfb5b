"""A hint student on Ray Train (2 CPU workers, gloo DDP): the teacher's hidden states streamed
from a real ``stkd serve`` process, or read from a label cache made with them.

Checks: the loss parts include a nonzero ``hint`` term; the two ranks hold the same student AND
the same projection after every epoch (the digest covers both: the projection is in the module
DDP wraps); the projection changes with training and is kept in the checkpoints' training
state, never in their model; a cache with the hidden states trains the very same student.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stkd_dist.checkpoint import list_checkpoints, load_checkpoint_state, load_forecaster
from stkd_dist.config import load_config
from stkd_dist.labels.teachers import TeacherSpec, parse_labels
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.teacher import load_teacher
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.student import StudentRequest, train_student
from tests.train.student_env import (
    EPOCHS,
    OPTIONS,
    Env,
    Server,
    assert_same_weights,
    deliveries,
    final_weights,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HINT = ["distill.loss=hint", "distill.beta=1.0"]


def test_a_hint_student_distils_the_streamed_hidden_states(
    ray_local: None, env: Env, spawn: Callable[..., Server], tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    server = spawn(env.ckpt["a"])
    cfg = load_config(env.config, ["run.name=hint", *HINT])
    request = StudentRequest(teachers=(TeacherSpec("stream", server.address),), client=OPTIONS)
    out = train_student(cfg, request, storage=root, echo=lambda _: None)
    assert out.trained and out.epochs_done == EPOCHS
    experiment = root / "runs" / "hint" / "student_kd"
    deliveries(experiment, cfg)  # every window of every rank's shard streamed exactly once
    history = read_history(experiment)
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    for h in history:
        assert h["train_hint"] > 0 and {"train_task", "train_match"} <= h.keys()
        # DDP kept the ranks equal: the student and its projection
        assert len(h["param_digests"]) == 2 and len(set(h["param_digests"])) == 1, h
    assert history[0]["param_digests"] != history[1]["param_digests"]
    # the projection is trained (it changed between the epochs' checkpoints) and kept for
    # resuming; the checkpoint's model is the student alone, loadable for inference
    epochs = [c for c in list_checkpoints(experiment) if not c.mid_epoch]
    states = [load_checkpoint_state(c.path) for c in epochs]
    first, last = states[0]["loss_state"], states[-1]["loss_state"]
    assert first["weight"].shape == (8, 32)  # F_t of the LSTM teacher, F_s of the mlp student
    assert not torch.equal(first["weight"], last["weight"])
    assert not any("projection" in k for k in states[-1]["model"])
    student, _ = load_forecaster(epochs[-1].path, role="student_kd")
    assert student.key == "mlp"

    # the same teacher's hidden states from a label cache: the very same student
    cache = tmp_path / "hidden.zarr"
    precompute_labels(load_teacher(env.ckpt["a"], env.store), cache, ["train"], hidden=True)
    cached = train_student(
        load_config(env.config, ["run.name=hint-cached", *HINT]),
        StudentRequest(teachers=(parse_labels(f"cache:{cache}"),)),
        storage=root,
        echo=lambda _: None,
    )
    assert_same_weights(final_weights(experiment), final_weights(cached.experiment))
    again = load_checkpoint_state(list_checkpoints(cached.experiment)[-1].path)["loss_state"]
    assert torch.equal(again["weight"], last["weight"])
