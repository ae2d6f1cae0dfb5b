"""Elastic training on a real multi-node Ray cluster: a node lost mid-epoch, then one added.

``ray.cluster_utils.Cluster`` starts a head without CPUs and three one-CPU worker nodes, each a
raylet of its own, so Ray Train places one training worker per node. The teacher trains with
``cluster.num_workers: {min: 2, max: 3}``; once Ray registered a mid-epoch checkpoint the node of
one worker is removed. Training must continue on the two nodes left and grow back to three when
a new node joins, and every training window of every epoch must have been trained on exactly
once, counted from the batches the loss received (:class:`~stkd_dist.testing.WindowLog`), not
from the plan.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from stkd_dist.config import write_config
from stkd_dist.config.validate import validate_config
from stkd_dist.testing import WindowLog, registered, trained_windows, wait_until
from stkd_dist.train.experiment import fit, open_experiment
from stkd_dist.train.loop import TrainJob
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.teacher import EXPERIMENT, masked_mae_loss
from tests.train.conftest import gwnet_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def cluster(gwnet_store: Path) -> Iterator[Cluster]:
    torch.set_num_threads(1)
    # Ray Train first retries on the resources it last saw; a worker group that cannot start
    # (its node is gone) times out after this long (Ray's default: 60 s), then it shrinks
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    # no CPUs on the head: the only places a training worker fits are the three worker nodes
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()
    os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)


def test_a_node_lost_for_good_training_finishes_on_the_rest(
    cluster: Cluster, gwnet_store: Path, tmp_path: Path
) -> None:
    cfg = gwnet_config(
        gwnet_store,
        "elastic",
        5,
        "cluster.num_workers={min: 2, max: 3}",
        "checkpoint.every_steps=2",  # 6 steps an epoch on 3 workers
        "cluster.resize_interval_s=3",  # look for a returned node every 3 s
    )
    validate_config(cfg, roles=("teacher",), distill=False)
    exp = open_experiment(cfg, EXPERIMENT, tmp_path / "storage")
    write_config(cfg, exp.run / "config.yaml")
    log = tmp_path / "windows"
    job = TrainJob(
        config=cfg,
        role="teacher",
        experiment=EXPERIMENT,
        dataset=str(exp.dataset),
        make_loss=WindowLog(masked_mae_loss, log),
        experiment_dir=str(exp.path),
    )

    # Ray starts nodes from the main thread only (signal handlers): training runs beside it
    failed: list[BaseException] = []

    def train() -> None:
        try:
            fit(job, exp.run, cfg.teacher.schedule.epochs)
        except BaseException as e:  # re-raised below, in the test's thread
            failed.append(e)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()

    # inside epoch 1, after its first mid-epoch checkpoint: the node of rank 2 goes away
    def training_or(event: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            if failed:  # training ended with an error: show it, not a timeout
                raise failed[0]
            return event()

        return check

    wait_until(training_or(lambda: registered(exp.path, "epoch_0001_step_")), 300, "a checkpoint")
    status = json.loads((exp.path / "workers" / "rank-2.json").read_text())
    node = next(n for n in cluster.list_all_nodes() if n.node_id == status["node_id"])
    removed = node.node_id
    cluster.remove_node(node, allow_graceful=False)
    # once two workers finished an epoch, a new node joins: training must grow back to three
    wait_until(
        training_or(lambda: any(h["world_size"] == 2 for h in read_history(exp.path))),
        300,
        "an epoch on two",
    )
    added = cluster.add_node(num_cpus=1).node_id
    thread.join(timeout=600)
    assert not thread.is_alive(), "training did not finish"
    if failed:
        raise failed[0]

    history = read_history(exp.path)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    sizes = [h["world_size"] for h in history]
    # epoch 0 on three workers, epoch 1 began on three and ended on two, then back to three
    assert sizes[:2] == [3, 2] and sizes[-1] == 3, sizes
    assert history[-1]["attempt"] >= 2  # started, shrunk, grew
    nodes = {json.loads(f.read_text())["node_id"] for f in (exp.path / "workers").glob("*.json")}
    assert added in nodes and removed not in nodes

    # the data side: the windows the loss was given, in the steps the run kept
    seen = trained_windows(log)
    split = list(exp.reader.windows("train"))
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for epoch, windows in seen.items():
        counts = Counter(windows)
        twice = [w for w, n in counts.items() if n > 1]
        assert not twice, f"epoch {epoch}: windows trained on twice: {twice[:10]}"
        assert sorted(counts) == split, f"epoch {epoch}: {len(split) - len(counts)} missing"
    # and epoch 1 was really split between the two world sizes
    worlds = {
        json.loads(x)["world_size"]
        for f in log.glob("*.jsonl")
        for x in f.open()
        if '"epoch": 1,' in x
    }
    assert worlds == {2, 3}
    assert all(h["samples"] == len(split) for h in history)  # the re-dealt epochs add up
