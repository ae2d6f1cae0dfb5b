"""Teacher replicas as named Ray actors, found by ``ray:PREFIX`` (real local Ray cluster)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
import torch

from stkd_dist.config.pipeline import AutoscaleSection
from stkd_dist.errors import ConfigError
from stkd_dist.labels.autoscale import Autoscaler
from stkd_dist.labels.fleet import FleetSecurity, ReplicaFleet, start_teacher_replicas
from stkd_dist.serving.client import (
    Backoff,
    ClientOptions,
    SoftLabelClient,
    TeacherUnavailableError,
)
from stkd_dist.serving.discovery import EndpointSource
from stkd_dist.serving.server import ServerConfig
from tests.serving.tls_refusals import CLOSED_BY_SERVER, assert_client_refused

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local(teacher_env: object) -> Iterator[None]:
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _fleet(env: Any, prefix: str, n: int = 1, **kw: Any) -> ReplicaFleet:
    """``n`` replicas of the session's tiny teacher, named ``<prefix>-<i>``."""
    return start_teacher_replicas(
        n, env.checkpoint, env.store, config=ServerConfig(batch_size=32), name_prefix=prefix,
        num_cpus=0.5, **kw,
    )  # fmt: skip


def test_ray_endpoints_need_a_cluster() -> None:
    if ray.is_initialized():
        pytest.skip("a Ray cluster is connected in this process")
    with pytest.raises(ConfigError, match="Ray cluster"):
        EndpointSource("ray:stkd-teacher").resolve()


def test_replicas_in_ray_actors_serve_and_fail_over(
    ray_local: None, teacher_env: Any, direct: Any
) -> None:
    fleet = _fleet(teacher_env, "stkd-test-teacher", 2)
    actors = fleet.actors
    addresses = ray.get([a.address.remote() for a in actors])
    assert len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
    source = EndpointSource("ray:stkd-test-teacher")
    assert sorted(e.address for e in source.resolve()) == sorted(addresses)

    wanted = np.tile(np.arange(397), 20)
    client = SoftLabelClient(
        "ray:stkd-test-teacher",
        expected_fingerprint=teacher_env.fingerprint,
        max_message_bytes=16384,
        prefetch=2,
        backoff=Backoff(initial_s=0.05, max_s=0.5, max_attempts=8),
    )
    with client:
        stream = client.stream("train", wanted)
        items = [next(stream)]
        (first,) = client.stats.endpoints
        ray.kill(actors[addresses.index(first)])  # the replica serving us dies
        items.extend(stream)
    idx = np.concatenate([i for i, _ in items])
    np.testing.assert_array_equal(idx, wanted)
    pred = np.concatenate([lab.prediction for _, lab in items])
    ref = direct.predict(np.arange(397)).prediction
    np.testing.assert_allclose(pred, ref[idx], rtol=1e-5, atol=1e-5)
    assert client.stats.endpoints == set(addresses)
    survivor = actors[1 - addresses.index(first)]
    info = ray.get(survivor.info.remote())
    assert info.forward_windows > 0 and info.active_streams == 0


def test_a_replica_that_dies_is_started_again_and_found_by_its_name(
    ray_local: None, teacher_env: Any, direct: Any
) -> None:
    (actor,) = _fleet(teacher_env, "stkd-test-restart", 1).actors
    pid = ray.get(actor.info.remote()).pid
    try:
        ray.kill(actor, no_restart=False)  # the actor's process dies, as with its node
        # Ray starts it again: its constructor loads the teacher and binds a port; wait for
        # the answer of the new process (the kill takes effect asynchronously)
        deadline = time.monotonic() + 120
        info = None
        while (info is None or info.pid == pid) and time.monotonic() < deadline:
            try:
                info = ray.get(actor.info.remote(), timeout=120)
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                continue
        assert info is not None and info.pid != pid and info.forward_windows == 0
        (found,) = EndpointSource("ray:stkd-test-restart").resolve()
        assert found.address == info.address
        client = SoftLabelClient(
            "ray:stkd-test-restart", expected_fingerprint=teacher_env.fingerprint
        )
        with client:
            items = list(client.stream("train", np.arange(60)))
        pred = np.concatenate([lab.prediction for _, lab in items])
        np.testing.assert_array_equal(pred, direct.predict(np.arange(60)).prediction)
    finally:
        ray.kill(actor)


FAST = Backoff(initial_s=0.01, max_s=0.1, max_attempts=3)


def test_a_secured_fleet_binds_the_node_address_and_serves_only_over_tls(
    ray_local: None, teacher_env: Any, direct: Any
) -> None:
    security = FleetSecurity()
    fleet = _fleet(teacher_env, "stkd-test-secure", 1, security=security)
    try:
        (found,) = EndpointSource(fleet.endpoint).resolve()
        # the node's address, not loopback: students on other nodes can reach it
        assert found.address.split(":")[0] == ray.util.get_node_ip_address()
        assert found.tls_name == "stkd-test-secure-0.replica.stkd"
        options = fleet.client_options(ClientOptions(backoff=FAST))
        assert options.token == security.token and options.tls_ca_pem == security.ca.cert_pem
        with SoftLabelClient(
            fleet.endpoint, expected_fingerprint=teacher_env.fingerprint, options=options
        ) as client:
            pred = np.concatenate(
                [lab.prediction for _, lab in client.stream("train", np.arange(40))]
            )
        np.testing.assert_array_equal(pred, direct.predict(np.arange(40)).prediction)
        # the token alone, in plaintext: the replica ends the connection in the TLS handshake,
        # before any call is made (one that got through would have been answered)
        plain = ClientOptions(token=security.token, backoff=FAST)
        with (
            SoftLabelClient(
                fleet.endpoint, expected_fingerprint=teacher_env.fingerprint, options=plain
            ) as client,
            pytest.raises(TeacherUnavailableError) as refused,
        ):
            client.describe()
        assert_client_refused(refused.value, CLOSED_BY_SERVER)
        assert refused.value.where == found.address
        (counters,) = fleet.counters()
        assert counters.streams_served == 1 and counters.name == "stkd-test-secure-0"
    finally:
        fleet.close()


def test_a_replica_added_mid_run_gets_the_next_stream_without_a_failure(
    ray_local: None, teacher_env: Any
) -> None:
    fleet = _fleet(teacher_env, "stkd-test-grow", 1)
    try:
        client = SoftLabelClient(
            fleet.endpoint,
            expected_fingerprint=teacher_env.fingerprint,
            # resolve the actors again whenever a stream opens
            options=ClientOptions(discovery_s=0.001, prefetch=1, max_message_bytes=16384),
        )
        with client:
            # not read: it waits, with more labels (38 MB) than gRPC's flow-control windows hold
            busy = client.stream("train", np.tile(np.arange(397), 200))
            next(busy)
            added = fleet.add()
            fresh = list(client.stream("train", np.arange(100)))
            assert sum(len(i) for i, _ in fresh) == 100
            # the busy replica owes windows, the new one none: the stream went to the new one
            assert len(client.stats.endpoints) == 2 and client.stats.reconnects == 0
            busy.close()
        served = {c.name: c.streams_served for c in fleet.counters()}
        assert served == {"stkd-test-grow-0": 1, added: 1}
        fleet.remove(added)  # drained, stopped; its counters stay with the fleet
        assert fleet.size() == 1
        assert {c.name for c in fleet.counters()} == {"stkd-test-grow-0", added}
    finally:
        fleet.close()


def test_the_autoscaler_removes_idle_replicas_down_to_min(
    ray_local: None, teacher_env: Any
) -> None:
    fleet = _fleet(teacher_env, "stkd-test-shrink", 2)
    policy = AutoscaleSection(min=1, max=2, target_wait=0.2, interval_s=0.1, idle_s=0.2)
    # no student reports any step: the fleet is idle
    scaler = Autoscaler(policy, fleet, lambda: (0.0, 0.0, 0))
    try:
        ready = threading.Event()
        for _ in range(100):
            if scaler.tick().action == "remove":
                break
            ready.wait(0.1)  # the replicas become idle_s old
        assert fleet.size() == 1
        removed = [d for d in scaler.timeline if d.action == "remove"]
        assert len(removed) == 1 and removed[0].replicas == 1
        assert scaler.tick().action == "hold"  # at min: the last one stays
        assert fleet.size() == 1
        names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True)]
        assert removed[0].replica not in names  # its actor is gone
    finally:
        fleet.close()
