"""Unit tests of the sweep's schedulers, retries and trial records (no Ray cluster)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from stkd_dist.config import config_from_text, dump_config, load_config
from stkd_dist.config.models import OptimSection, ScheduleSection
from stkd_dist.config.sweep import parse_space
from stkd_dist.errors import ConfigError
from stkd_dist.pipeline.sweep_tuner import (
    KeepInBounds,
    RecordingASHA,
    build_scheduler,
    checkpoint_config,
    failure_config,
    pbt_mutations,
    scheduler_summary,
)
from stkd_dist.pipeline.trial_records import (
    SCHEDULER_STOP,
    STOP,
    log_start,
    read_starts,
    state_digest,
    stop_reason,
    trial_summary,
    write_stop,
)
from stkd_dist.pipeline.tune_space import apply_params
from stkd_dist.pipeline.tune_trial import TIME_ATTR
from stkd_dist.train.schedule import apply_optim_settings, lr_at
from stkd_dist.train.schedule import build_scheduler as lr_schedule

SPACE = {
    "distill.alpha": {"uniform": [0.2, 0.9]},
    "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
    "student.model": {"choice": ["mlp", "linear"]},
    "student.kwargs.embed_dim": {"choice": [16, 32, 64]},
}


def cfg_with(*extra: str, space: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    return load_config("demo", [f"sweep.space={json.dumps(space or SPACE)}", *extra])


@pytest.mark.parametrize(
    ("scheduler", "key", "owner"),
    [
        ("pbt", "grace_period", "asha"),
        ("pbt", "reduction_factor", "asha"),
        ("asha", "perturbation_interval", "pbt"),
    ],
)
def test_a_key_of_the_other_scheduler_is_an_error(scheduler: str, key: str, owner: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_with(f"sweep.scheduler={scheduler}", f"sweep.{key}=2")
    assert e.value.where is not None and e.value.where.endswith(f"sweep.{key}")
    assert f"sweep.scheduler {owner!r}" in e.value.message
    assert f"sweep.scheduler is {scheduler!r}" in e.value.message
    # null is "not given": accepted with either scheduler
    assert (
        cfg_with(f"sweep.scheduler={scheduler}", f"sweep.{key}=null").sweep.scheduler == scheduler
    )


def test_scheduler_defaults_fill_the_keys_left_out() -> None:
    asha = cfg_with()
    assert asha.sweep.scheduler == "asha" and asha.sweep.max_failures == 2
    assert asha.sweep.scheduler_settings == {"grace_period": 1, "reduction_factor": 2}
    pbt = cfg_with("sweep.scheduler=pbt", "sweep.max_epochs=6")
    assert pbt.sweep.scheduler_settings == {"perturbation_interval": 2}
    given = cfg_with("sweep.scheduler=pbt", "sweep.max_epochs=6", "sweep.perturbation_interval=3")
    assert given.sweep.scheduler_settings == {"perturbation_interval": 3}
    # a dumped config (what runs keep) loads back equal, and its scheduler can still be switched
    assert config_from_text(dump_config(pbt), "dump") == pbt
    assert config_from_text(dump_config(asha), "dump").sweep.grace_period is None


@pytest.mark.parametrize(
    ("extra", "where", "needle"),
    [
        (("sweep.scheduler=pbt", "sweep.samples=1"), "sweep.samples", "population"),
        (
            ("sweep.scheduler=pbt", "sweep.max_epochs=2"),
            "sweep.perturbation_interval",
            "< max_epochs",
        ),
        (("sweep.scheduler=pbt", "sweep.perturbation_interval=0"), "perturbation_interval", "> 0"),
        (("sweep.max_epochs=2", "sweep.grace_period=3"), "sweep.grace_period", "<= max_epochs"),
        (("sweep.reduction_factor=1",), "sweep.reduction_factor", ">= 2"),
        (("sweep.max_failures=-2",), "sweep.max_failures", "-1 for unlimited"),
    ],
)
def test_scheduler_ranges_name_the_key(extra: tuple[str, ...], where: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_with(*extra)
    assert e.value.where is not None and e.value.where.endswith(where), e.value
    assert needle in e.value.message


def test_pbt_needs_a_key_it_may_mutate() -> None:
    arch = {
        "student.model": {"choice": ["mlp", "linear"]},
        "student.kwargs.embed_dim": {"choice": [8, 16]},
    }
    with pytest.raises(ConfigError) as e:
        cfg_with("sweep.scheduler=pbt", space=arch)
    assert e.value.where is not None and e.value.where.endswith("sweep.space")
    assert "never mutates" in e.value.message
    cfg_with("sweep.scheduler=pbt", space={**arch, "distill.alpha": {"uniform": [0.2, 0.9]}})


def test_pbt_mutations_follow_the_space_and_spare_the_architecture() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    specs = parse_space(
        {
            "distill.alpha": {"uniform": [0.2, 0.9]},
            "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
            "distill.beta": {"quniform": [0.0, 1.0, 0.25]},
            "data.batch_size": {"randint": [16, 65]},
            "distill.loss": {"choice": ["regression", "dkd_reg"]},
            "distill.temperature": {"grid": [1.0, 2.0]},
            "student.model": {"choice": ["mlp", "linear"]},
            "student.kwargs.embed_dim": {"choice": [8, 16]},
        }
    )
    mutations = pbt_mutations(specs)
    assert set(mutations) == {
        "distill.alpha",
        "student.optim.lr",
        "distill.beta",
        "data.batch_size",
        "distill.loss",
        "distill.temperature",
    }
    alpha = mutations["distill.alpha"]
    assert isinstance(alpha, Float) and (alpha.lower, alpha.upper) == (0.2, 0.9)
    assert isinstance(mutations["student.optim.lr"].sampler, Float._LogUniform)
    assert mutations["distill.beta"].sampler.q == 0.25
    assert isinstance(mutations["data.batch_size"], Integer)
    assert mutations["distill.loss"] == ["regression", "dkd_reg"]
    assert mutations["distill.temperature"] == [1.0, 2.0]
    assert not any(isinstance(m, Categorical) for m in mutations.values())


def test_keep_in_bounds_clamps_what_pbt_multiplies_out_of_range() -> None:
    specs = parse_space(
        {
            "distill.alpha": {"uniform": [0.2, 0.9]},
            "student.optim.lr": {"loguniform": [1e-4, 1e-2]},
            "distill.beta": {"quniform": [0.0, 1.0, 0.25]},
            "data.batch_size": {"randint": [16, 65]},
            "student.kwargs.embed_dim": {"randint": [8, 33]},
        }
    )
    keep = pickle.loads(pickle.dumps(KeepInBounds(specs)))  # Tune pickles its scheduler
    out = keep(
        {
            "distill.alpha": 1.02,
            "student.optim.lr": 5e-5,
            "distill.beta": 0.3,
            "data.batch_size": 77,
            "student.kwargs.embed_dim": 99,  # architecture: never mutated, never touched
            "other": "x",
        }
    )
    assert out == {
        "distill.alpha": 0.9,
        "student.optim.lr": 1e-4,
        "distill.beta": 0.25,
        "data.batch_size": 64,
        "student.kwargs.embed_dim": 99,
        "other": "x",
    }
    assert isinstance(out["data.batch_size"], int)


def test_every_config_pbt_explores_is_a_valid_trial_config() -> None:
    from ray.tune.schedulers.pbt import _explore

    cfg = cfg_with("sweep.scheduler=pbt")
    specs = cfg.sweep.params()
    mutations, keep = pbt_mutations(specs), KeepInBounds(specs)
    random.seed(0)
    config = {
        "distill.alpha": 0.88,
        "student.optim.lr": 9e-3,
        "student.model": "mlp",
        "student.kwargs.embed_dim": 32,
    }
    for _ in range(200):  # PBT's own explore step, again and again
        config, _ = _explore(config, mutations, 0.25, (1.2, 0.8), keep)
        trial = apply_params(cfg, config)  # raises on an out-of-range value
        assert 0.2 <= trial.distill.alpha <= 0.9 and 1e-4 <= trial.student.optim.lr <= 1e-2
        assert config["student.model"] == "mlp" and config["student.kwargs.embed_dim"] == 32


def test_schedulers_checkpoints_and_retries_come_from_the_sweep_section(tmp_path: Path) -> None:
    from ray.tune.schedulers import PopulationBasedTraining

    asha_cfg = cfg_with("sweep.max_epochs=6", "sweep.grace_period=2", "cluster.max_failures=0")
    asha = build_scheduler(asha_cfg, asha_cfg.sweep.params(), str(tmp_path))
    assert isinstance(asha, RecordingASHA)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == (TIME_ATTR, 6, 2)
    assert asha._brackets[0]._rungs[-1][0] == 2  # the first rung: the grace period
    assert checkpoint_config(asha_cfg).num_to_keep == asha_cfg.sweep.keep_best == 2
    # trials retry by sweep.max_failures, not by the Ray Train workers' cluster.max_failures
    retries = failure_config(asha_cfg)
    assert retries.max_failures == 2 and not retries.fail_fast

    pbt_cfg = cfg_with(
        "sweep.scheduler=pbt", "sweep.perturbation_interval=3", "sweep.max_failures=5"
    )
    specs = pbt_cfg.sweep.params()
    pbt = build_scheduler(pbt_cfg, specs, str(tmp_path))
    assert isinstance(pbt, PopulationBasedTraining)
    assert (pbt._time_attr, pbt._perturbation_interval) == (TIME_ATTR, 3)
    assert set(pbt._hyperparam_mutations) == {"distill.alpha", "student.optim.lr"}
    assert isinstance(pbt._custom_explore_fn, KeepInBounds)
    # every checkpoint stays: an exploit may restore a donor's that newer ones would have pruned
    assert checkpoint_config(pbt_cfg).num_to_keep is None
    assert failure_config(pbt_cfg).max_failures == 5
    summary = scheduler_summary(pbt_cfg, specs)
    assert summary["name"] == "pbt" and summary["perturbation_interval"] == 3
    assert set(summary["hyperparam_mutations"]) == {"distill.alpha", "student.optim.lr"}


def test_recording_asha_records_the_trials_it_stops_at_a_rung(tmp_path: Path) -> None:
    asha = RecordingASHA(
        str(tmp_path),
        time_attr=TIME_ATTR,
        metric="val_mae",
        mode="min",
        max_t=3,
        grace_period=1,
        reduction_factor=2,
    )
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, {TIME_ATTR: 1, "val_mae": 1.0}) == "CONTINUE"
    assert asha.on_trial_result(None, bad, {TIME_ATTR: 1, "val_mae": 2.0}) == "STOP"
    record = json.loads((tmp_path / "bad" / SCHEDULER_STOP).read_text())
    assert record["scheduler"] == "asha" and record["epochs_done"] == 1
    # at max_t ASHA stops every trial: not a scheduler decision, nothing recorded
    assert asha.on_trial_result(None, good, {TIME_ATTR: 3, "val_mae": 0.5}) == "STOP"
    assert not (tmp_path / "good").exists()


def test_stop_reason_prefers_an_error_then_the_trials_own_record() -> None:
    own = {"reason": "early_stopping"}
    sched = {"scheduler": "asha"}
    assert stop_reason(True, own, sched) == "failed"
    assert stop_reason(False, own, sched) == "early_stopping"
    assert stop_reason(False, {"reason": "completed"}, None) == "completed"
    assert stop_reason(False, None, sched) == "scheduler"
    assert stop_reason(False, None, None) == "unknown"


def test_trial_summary_from_the_records(tmp_path: Path) -> None:
    worker = {"rank": 0, "pid": 11, "node_id": "n1"}
    log_start(
        tmp_path, {"after_epoch": -1, "attempt": 0, "restored_from": None, "workers": [worker]}
    )
    write_stop(tmp_path, "completed", 4)
    # a start after the trial recorded its end (PBT exploited it at that report): it trains on
    donor = {"trial": "d", "checkpoint": "/x/trial_d/checkpoint_000002", "epochs_done": 3}
    second = {"rank": 0, "pid": 12, "node_id": "n2"}
    log_start(
        tmp_path,
        {
            "after_epoch": 2,
            "attempt": 1,
            "restored_from": donor,
            "params": {"a": 1},
            "workers": [second],
        },
    )
    assert not (tmp_path / STOP).exists()
    assert [s["workers"][0]["pid"] for s in read_starts(tmp_path)] == [11, 12]
    summary = trial_summary("t", tmp_path, failed=False, epochs_done=3)
    assert summary["stop_reason"] == "unknown"  # neither it nor a scheduler said why it ended
    write_stop(tmp_path, "early_stopping", 5)
    summary = trial_summary("t", tmp_path, failed=False, epochs_done=5)
    assert summary["stop_reason"] == "early_stopping" and summary["epochs_done"] == 5
    assert summary["workers"] == [second]  # the latest start's processes
    assert [s["restored_from"] for s in summary["starts"]] == [None, "d"]
    assert summary["exploits"] == [
        {
            "trial": "t",
            "donor": "d",
            "epoch": 3,
            "checkpoint": donor["checkpoint"],
            "params": {"a": 1},
        }
    ]
    assert trial_summary("t", tmp_path, failed=True, epochs_done=5)["stop_reason"] == "failed"
    # a trial restored from its own checkpoint (crash, pause) is no exploit
    own = tmp_path / "own"
    log_start(own, {"after_epoch": 1, "restored_from": {"trial": "own", "epochs_done": 2}})
    assert trial_summary("own", own, failed=False, epochs_done=2)["exploits"] == []


def test_a_results_trial_is_the_one_of_its_folder() -> None:
    from stkd_dist.pipeline.sweep_results import trial_id_of

    # a trial PBT exploited at its donor's last checkpoint ends with the donor's last result
    exploited = SimpleNamespace(path="/s/tune/trial_ab_00003", metrics={"trial_id": "ab_00000"})
    assert trial_id_of(exploited) == "ab_00003"
    failed = SimpleNamespace(path="bucket/runs/x/sweep/tune/trial_ab_00001/", metrics={})
    assert trial_id_of(failed) == "ab_00001"


def test_state_digest_is_tensor_equality() -> None:
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.float64)}
    same = {"b": torch.zeros(3, dtype=torch.float64), "w": torch.arange(6.0).reshape(2, 3)}
    assert state_digest(a) == state_digest(same)
    changed = {**a, "w": a["w"].clone()}
    changed["w"][1, 2] = torch.nextafter(changed["w"][1, 2], torch.tensor(10.0))
    assert state_digest(changed) != state_digest(a)
    assert state_digest({**a, "w": a["w"].reshape(3, 2)}) != state_digest(a)
    assert state_digest({**a, "b": a["b"].float()}) != state_digest(a)


SCHEDULE = ScheduleSection(epochs=6, warmup_epochs=1, min_lr=1e-5)


def _optimizer(lr: float, weight_decay: float) -> tuple[torch.optim.AdamW, Any, OptimSection]:
    """A model's AdamW and its schedule, as a trial builds them for ``lr`` and ``weight_decay``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    optim = OptimSection(lr=lr, weight_decay=weight_decay)
    return opt, lr_schedule(opt, SCHEDULE), optim


def test_a_restored_optimizer_takes_the_trials_own_settings() -> None:
    donor_opt, donor_sched, _ = _optimizer(1e-2, 1e-4)
    for _ in range(3):
        donor_opt.step()
        donor_sched.step()
    saved_opt, saved_sched = donor_opt.state_dict(), donor_sched.state_dict()

    # restored from its own checkpoint: nothing changes, bit for bit
    opt, sched, optim = _optimizer(1e-2, 1e-4)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    before = [dict(g) for g in opt.param_groups]
    apply_optim_settings(opt, sched, optim)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in before]
    assert sched.get_last_lr() == [g["lr"] for g in before]

    # after an exploit: the donor's state at the donor's epoch, with the mutated lr and decay
    opt, sched, optim = _optimizer(4e-3, 0.0)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    apply_optim_settings(opt, sched, optim)
    assert sched.last_epoch == 3
    group = opt.param_groups[0]
    expected = lr_at(3, SCHEDULE, 4e-3)
    assert group["lr"] == pytest.approx(expected) and group["weight_decay"] == 0.0
    assert len(opt.state) == len(donor_opt.state)  # Adam's moments are the donor's
    sched.step()  # the schedule goes on from the trial's own base rate
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(4, SCHEDULE, 4e-3))


def test_a_data_parallel_trials_actor_reserves_almost_nothing() -> None:
    from stkd_dist.pipeline.sweep_tuner import trial_resources

    one = cfg_with("sweep.cpus_per_worker=2", "sweep.gpus_per_worker=0.5")
    assert trial_resources(one) == {"cpu": 2, "gpu": 0.5}
    # the Ray Train run places the workers; the actor that drives it holds one byte
    many = cfg_with("sweep.trial_workers=2", "sweep.cpus_per_worker=2")
    assert trial_resources(many) == {"cpu": 0, "memory": 1}
    with pytest.raises(ConfigError, match="trial_workers"):
        cfg_with("sweep.trial_workers=0")
