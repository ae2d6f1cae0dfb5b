"""A PBT sweep on a local Ray cluster (2 CPUs): exploits load the donor's checkpoint.

Four trials (a grid over a frozen learning rate, 1e-30, and a learning one, twice; ``distill.alpha``
drawn), perturbed after every epoch: the frozen ones are always in the bottom quarter, so PBT has
them continue from a learning trial's checkpoint. Every claim is checked against the checkpoint
files the donors wrote, not against ``summary.json``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
import torch

from stkd_dist.checkpoint import load_checkpoint_state, read_checkpoint
from stkd_dist.config import Config
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec, resolve_teachers
from stkd_dist.location import url
from stkd_dist.pipeline.sweep import SweepOutcome, run_sweep
from stkd_dist.pipeline.trial_records import read_starts, state_digest
from stkd_dist.pipeline.tune_trial import ROLE
from stkd_dist.pipeline.ui import LinesUI
from stkd_dist.storage import open_store
from stkd_dist.testing import LocalSession
from stkd_dist.train.loop import TrainJob, build_model, build_reader
from stkd_dist.train.student import make_distill_loss
from stkd_dist.train.worker import run_worker
from tests.pipeline.sweep_env import make_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]

FROZEN, LEARNS = 1e-30, 5e-3
SPACE = {
    "student.optim.lr": {"grid": [FROZEN, LEARNS]},
    "distill.alpha": {"uniform": [0.2, 0.9]},
}
MAX_EPOCHS = 4


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SweepOutcome]:
    root = tmp_path_factory.mktemp("pbt")
    env = make_env(
        root,
        run="pbt",
        space=SPACE,
        samples=2,  # the grid twice: 4 trials
        max_epochs=MAX_EPOCHS,
        scheduler="pbt",
        grace_period=None,
        perturbation_interval=1,
        # all 4 at once (2 run, PBT pauses them in turn), so they form one population
        max_concurrent=4,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STKD_DASK", "threads")  # see test_sweep_ray
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            yield run_sweep(
                env.config,
                checkpoint=str(env.teacher),
                storage=root / "storage",
                ui=LinesUI(),
            )
        finally:
            ray.shutdown()


def _exploits(outcome: SweepOutcome) -> list[dict[str, Any]]:
    """The starts, in the trials' own records, that loaded another trial's checkpoint."""
    out = []
    for trial_dir in sorted(outcome.layout.trials.iterdir()):
        for start in read_starts(trial_dir):
            source = start["restored_from"]
            if source is not None and source["trial"] != trial_dir.name:
                out.append({"trial": trial_dir.name, **start})
    return out


def _initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The weights a trial of ``cfg``'s student starts from (as ``run_trial`` builds them)."""
    store = open_store(cfg.data.dataset)
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.student, build_reader(cfg, store), store).state_dict()


def _checkpoints(outcome: SweepOutcome, trial: str) -> list[Path]:
    return sorted((outcome.layout.tune / f"trial_{trial}").glob("checkpoint_*"))


def test_an_exploited_trial_loaded_the_donors_checkpoint_weights(swept: SweepOutcome) -> None:
    exploits = _exploits(swept)
    assert exploits, "PBT never exploited (see the trials' starts.jsonl)"
    for e in exploits:
        source = e["restored_from"]
        donor_ckpt = Path(source["checkpoint"])
        # the donor's own checkpoint, still there (PBT keeps every checkpoint)
        assert donor_ckpt.parent.name == f"trial_{source['trial']}"
        info = read_checkpoint(donor_ckpt)
        assert info.metrics["trial"] == source["trial"] and info.epoch + 1 == source["epochs_done"]
        donor = load_checkpoint_state(donor_ckpt)["model"]
        # what the trial had in its model after loading is the donor file's weights, exactly
        assert source["weights_sha256"] == state_digest(donor)
        assert e["after_epoch"] == info.epoch
        # ... and not what the trial had itself: its weights at the start (every trial starts
        # from the same seed) and its own checkpoints from before (Ray reuses the name of the
        # one taken at the exploit, so that one may be gone)
        mine = [_initial_weights(info.config)] + [
            load_checkpoint_state(c)["model"]
            for c in _checkpoints(swept, e["trial"])
            if (c / "meta.json").stat().st_mtime < e["time"]
        ]
        for weights in mine:
            assert not all(torch.equal(weights[k], donor[k]) for k in donor)
        # it trained on from there, the donor's architecture with its own (mutated) settings
        later = [read_checkpoint(c) for c in _checkpoints(swept, e["trial"])]
        after = [i for i in later if (i.path / "meta.json").stat().st_mtime > e["time"]]
        if source["epochs_done"] == MAX_EPOCHS:  # the donor's last: nothing left to train
            assert not after
            stop = json.loads((swept.layout.trials / e["trial"] / "stop.json").read_text())
            assert stop["reason"] == "completed" and stop["epochs_done"] == MAX_EPOCHS
            continue
        first_after = min(after, key=lambda i: i.epoch)
        assert first_after.epoch == info.epoch + 1 and first_after.spec == info.spec
        trained = first_after.config
        assert trained.distill.alpha == pytest.approx(e["params"]["distill.alpha"])
        assert trained.student.optim.lr == pytest.approx(e["params"]["student.optim.lr"])
        assert 0.2 <= e["params"]["distill.alpha"] <= 0.9


def test_an_exploited_trial_trained_on_from_the_donors_file(
    swept: SweepOutcome, tmp_path: Path
) -> None:
    """Replayed here, outside Ray and Tune: one epoch from the donor's checkpoint file with the
    trial's own settings gives, bit for bit, the weights of the trial's next checkpoint; so the
    trial continued from exactly that file (not only from something with the same digest)."""
    summary = json.loads(swept.layout.summary.read_text())
    cache = summary["labels"]["cache"]
    replayed = 0
    for e in _exploits(swept):
        donor_ckpt = Path(e["restored_from"]["checkpoint"])
        info = read_checkpoint(donor_ckpt)
        nxt = [
            read_checkpoint(c)
            for c in _checkpoints(swept, e["trial"])
            if (c / "meta.json").stat().st_mtime > e["time"]
        ]
        if not nxt:
            continue  # the donor's last epoch: nothing trained after the exploit
        first_after = min(nxt, key=lambda i: i.epoch)
        assert first_after.epoch == info.epoch + 1
        cfg = first_after.config  # the trial's settings (mutated by PBT) as it trained
        store = open_store(cfg.data.dataset)
        reader = build_reader(cfg, store)
        dims = reader.dims
        # the labels the replicas computed, from the run's label cache they wrote through to
        (teacher,) = resolve_teachers(
            [TeacherSpec("cache", url(cache))],
            spread=False,
            fingerprint=store.fingerprint,
            window_shape=(dims.horizon, dims.nodes, dims.out_channels),
            windows=reader.windows("train"),
        )
        labels = LabelSpec((teacher,), store.fingerprint)
        out = tmp_path / f"replay-{e['trial']}-{info.epoch}"
        job = TrainJob(
            config=cfg,
            role="student",
            experiment=ROLE,
            dataset=cfg.data.dataset,
            make_loss=functools.partial(make_distill_loss, labels, str(out)),
            experiment_dir=str(out),
            lineage=e["trial"],
        )
        session = LocalSession(donor_ckpt, stop_after=1)
        with pytest.raises(LocalSession.Stop):
            run_worker(job, session)
        (mine,) = session.weights
        theirs = load_checkpoint_state(first_after.path)["model"]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), e
        replayed += 1
    assert replayed, "every exploit came after the donor's last epoch: nothing to replay"


def test_the_summary_lists_every_exploit(swept: SweepOutcome) -> None:
    summary = json.loads(swept.layout.summary.read_text())
    scheduler = summary["scheduler"]
    assert scheduler["name"] == "pbt" and scheduler["perturbation_interval"] == 1
    assert set(scheduler["hyperparam_mutations"]) == set(SPACE)
    listed = {(e["trial"], e["donor"], e["epoch"]) for e in scheduler["exploits"]}
    recorded = {
        (e["trial"], e["restored_from"]["trial"], e["restored_from"]["epochs_done"])
        for e in _exploits(swept)
    }
    assert listed == recorded and listed
    for e in scheduler["exploits"]:
        assert (swept.layout.root / e["checkpoint"]).is_dir()
    # PBT stops no trial: each ran its epochs
    assert summary["stop_reasons"]["completed"] == 4 and summary["stop_reasons"]["scheduler"] == 0


def test_pbt_keeps_every_checkpoint(swept: SweepOutcome) -> None:
    for trial_dir in sorted(swept.layout.tune.glob("trial_*")):
        progress = pd.read_csv(trial_dir / "progress.csv")
        # the checkpoint of every reported epoch is still there: none pruned (the result at which
        # PBT exploits a trial is not registered, and Ray names the trial's next checkpoint as it)
        kept = {c.name for c in trial_dir.glob("checkpoint_*")}
        assert kept == set(progress["checkpoint_dir_name"])
        assert progress["epochs_done"].max() == MAX_EPOCHS
