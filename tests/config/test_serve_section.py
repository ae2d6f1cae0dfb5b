"""The ``serve`` section's fleet settings: admission, security, placement, autoscaling."""

from __future__ import annotations

import pytest

from stkd_dist.config import load_config
from stkd_dist.errors import ConfigError
from stkd_dist.labels.started import ReplicaPlan, replica_plan


def test_fleet_settings_reach_the_replica_plan() -> None:
    cfg = load_config(
        "demo",
        [
            "serve.max_streams=3",
            "serve.cpus_per_replica=0.25",
            "serve.autoscale={min: 1, max: 3, target_wait: 0.25}",
        ],
    )
    plan = replica_plan(cfg.serve)
    assert plan.config.max_streams == 3 and plan.config.batch_size == cfg.serve.batch_size
    assert plan.num_cpus == 0.25 and plan.secure  # private by default
    assert plan.autoscale is not None and (plan.autoscale.min, plan.autoscale.max) == (1, 3)
    assert plan.autoscale.target_wait == 0.25 and plan.per_node is None


@pytest.mark.parametrize(
    ("override", "where", "rule"),
    [
        ("serve.autoscale={min: 3, max: 2}", "serve.autoscale.max", "must be >= min"),
        ("serve.autoscale={target_wait: 1.5}", "serve.autoscale.target_wait", "in (0, 1)"),
        ("serve.autoscale={mni: 1}", "serve.autoscale.mni", "did you mean 'min'"),
        ("serve.max_streams=0", "serve.max_streams", ">"),
        ("serve.replicas_per_node=0", "serve.replicas_per_node", ">= 1"),
    ],
)
def test_bad_fleet_settings_name_the_key(override: str, where: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert where in str(info.value) and rule in str(info.value)


def test_autoscale_and_replicas_per_node_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match=r"drop serve\.replicas_per_node or serve\.autoscale"):
        load_config("demo", ["serve.replicas_per_node=1", "serve.autoscale={max: 2}"])


def test_replica_plan_refuses_negative_cpus() -> None:
    with pytest.raises(ConfigError, match=r"serve\.cpus_per_replica"):
        ReplicaPlan(num_cpus=-1)
