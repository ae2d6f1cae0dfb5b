"""The shared batching queue: full batches across requests, splitting, dedup, failures, and
requests for the hidden states among requests without them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stkd_dist.serving.batcher import Batcher
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels
from stkd_dist.testing import wait_until


class FakeModel:
    """Labels that encode their window: prediction = index, spread = -index, hidden states (when
    asked for) = 10 * index; records batches and whether each computed hidden states."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.calls: list[np.ndarray] = []
        self.hidden_calls: list[bool] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, idx: np.ndarray, hidden: bool = False) -> NumpyLabels:
        with self.lock:
            self.calls.append(idx.copy())
            self.hidden_calls.append(hidden)
        if self.fail_on is not None and self.fail_on in idx:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        pred = np.broadcast_to(idx[:, None, None, None].astype(np.float32), (len(idx), 2, 3, 1))
        states = None
        if hidden:  # [n, N, F] = [n, 3, 4]
            states = np.broadcast_to(10 * idx[:, None, None].astype(np.float32), (len(idx), 3, 4))
        return LabelArrays(pred.copy(), -pred.copy(), None if states is None else states.copy())


def check(indices: np.ndarray, labels: NumpyLabels, hidden: bool = False) -> None:
    pred, spread = labels.prediction, labels.spread
    assert pred.shape == (len(indices), 2, 3, 1)
    np.testing.assert_array_equal(pred[:, 0, 0, 0], indices)
    assert spread is not None
    np.testing.assert_array_equal(spread[:, 0, 0, 0], -indices)
    if hidden:
        assert labels.hidden is not None and labels.hidden.shape == (len(indices), 3, 4)
        np.testing.assert_array_equal(labels.hidden[:, 0, 0], 10 * indices)
    else:
        assert labels.hidden is None


def test_requests_from_many_threads_share_full_batches() -> None:
    model = FakeModel(delay=0.01)
    batcher = Batcher(model, batch_size=32, max_wait_s=0.05)
    results: dict[int, NumpyLabels] = {}
    requests = {k: np.arange(k * 100, k * 100 + 8) for k in range(16)}  # 16 requests of 8

    def worker(k: int) -> None:
        results[k] = batcher.submit(requests[k]).result(timeout=10)

    threads = [threading.Thread(target=worker, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for k, idx in requests.items():
        check(idx, results[k])
    stats = batcher.stats()
    assert stats.windows == 128 and stats.requests == 16
    # windows of several requests went through the model together, never more than a batch
    assert stats.max_batch > 8 and stats.max_requests_per_batch > 1
    assert max(len(c) for c in model.calls) <= 32
    assert len(model.calls) < 16


def test_a_large_request_is_split_over_batches() -> None:
    model = FakeModel()
    batcher = Batcher(model, batch_size=10, max_wait_s=0.0)
    idx = np.arange(1000, 1045)
    labels = batcher.submit(idx).result(timeout=10)
    batcher.close()
    check(idx, labels)
    assert [len(c) for c in model.calls] == [10, 10, 10, 10, 5]


def test_order_of_a_request_is_kept_and_duplicates_run_once() -> None:
    model = FakeModel()
    batcher = Batcher(model, batch_size=64, max_wait_s=0.05)
    a = np.array([9, 3, 7, 3, 1])
    b = np.array([7, 9, 2])
    fa, fb = batcher.submit(a), batcher.submit(b)
    check(a, fa.result(timeout=10))
    check(b, fb.result(timeout=10))
    batcher.close()
    ran = np.concatenate(model.calls)
    assert sorted(ran.tolist()) == [1, 2, 3, 7, 9]  # each distinct window once


def test_a_failing_batch_fails_its_requests_only() -> None:
    model = FakeModel(fail_on=666)
    batcher = Batcher(model, batch_size=4, max_wait_s=0.0)
    bad = batcher.submit(np.array([665, 666, 667]))
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=10)
    good = batcher.submit(np.array([1, 2, 3]))
    check(np.array([1, 2, 3]), good.result(timeout=10))
    batcher.close()


def test_a_partial_batch_waits_at_most_max_wait() -> None:
    batcher = Batcher(FakeModel(), batch_size=1000, max_wait_s=0.05)
    started = time.monotonic()
    batcher.submit(np.arange(3)).result(timeout=10)
    waited = time.monotonic() - started
    batcher.close()
    assert 0.04 <= waited < 1.0


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(FakeModel(), batch_size=0)


class GatedModel(FakeModel):
    """A FakeModel whose first call waits until ``release`` is set (``entered`` says it began)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def __call__(self, idx: np.ndarray, hidden: bool = False) -> NumpyLabels:
        first = not self.entered.is_set()
        self.entered.set()
        if first:
            assert self.release.wait(10)
            if self.fail:
                with self.lock:
                    self.calls.append(idx.copy())
                raise RuntimeError("boom")
        return super().__call__(idx, hidden)


def test_windows_in_flight_are_not_computed_again() -> None:
    # no recent LRU: only the in-flight dedup can spare the second and third forward pass
    model = GatedModel()
    batcher = Batcher(model, batch_size=64, max_wait_s=0.0, recent_bytes=0)
    idx = np.arange(100, 164)
    first = batcher.submit(idx)
    assert model.entered.wait(10)  # the batch is computing
    again = [batcher.submit(idx[::-1]), batcher.submit(idx[:10])]
    # both attached to the batch in flight
    wait_until(lambda: batcher.stats().shared == 74, 10, "74 windows shared with the batch")
    model.release.set()
    check(idx, first.result(timeout=10))
    check(idx[::-1], again[0].result(timeout=10))
    check(idx[:10], again[1].result(timeout=10))
    batcher.close()
    assert len(model.calls) == 1 and model.calls[0].tolist() == idx.tolist()
    stats = batcher.stats()
    assert stats.windows == 64 and stats.batches == 1 and stats.max_requests_per_batch == 3


def test_recently_computed_windows_are_served_from_the_lru() -> None:
    model = FakeModel()
    batcher = Batcher(model, batch_size=16, max_wait_s=0.0)
    idx = np.arange(40)
    check(idx, batcher.submit(idx).result(timeout=10))
    mixed = np.array([5, 39, 40, 41, 0])  # three recent windows, two new ones
    check(mixed, batcher.submit(mixed).result(timeout=10))
    batcher.close()
    assert np.concatenate(model.calls).tolist() == [*range(42)]
    assert batcher.stats().recent_hits == 3


def test_on_batch_runs_before_the_futures_it_serves_resolve() -> None:
    model = GatedModel()
    stored: set[int] = set()
    lock = threading.Lock()
    violations: list[str] = []

    def on_batch(indices: np.ndarray, labels, n_requests: int) -> None:
        time.sleep(0.05)  # a slow write-through: futures must still wait for it
        with lock:
            stored.update(indices.tolist())

    def expect_stored(idx: np.ndarray):
        def callback(future) -> None:
            with lock:
                if not set(idx.tolist()) <= stored:
                    violations.append(f"{idx.tolist()} resolved before on_batch stored them")

        return callback

    batcher = Batcher(model, batch_size=8, max_wait_s=0.0, on_batch=on_batch)
    requests = [np.arange(0, 20)]
    futures = [batcher.submit(requests[0])]
    assert model.entered.wait(10)
    # one request shares the batch in flight, one takes new windows too
    requests += [np.arange(0, 8)[::-1], np.arange(15, 30)]
    futures += [batcher.submit(r) for r in requests[1:]]
    model.release.set()
    for f, r in zip(futures, requests, strict=True):
        f.add_done_callback(expect_stored(r))
        check(r, f.result(timeout=10))
    # served from the recent LRU: stored long ago, resolved at once
    late = batcher.submit(np.arange(5, 25))
    late.add_done_callback(expect_stored(np.arange(5, 25)))
    check(np.arange(5, 25), late.result(timeout=10))
    batcher.close()
    assert not violations
    assert sorted(stored) == list(range(30))
    assert sorted(np.concatenate(model.calls).tolist()) == list(range(30))


def test_a_failed_batch_fails_the_requests_attached_to_it() -> None:
    model = GatedModel(fail=True)
    batcher = Batcher(model, batch_size=8, max_wait_s=0.0, recent_bytes=0)
    first = batcher.submit(np.arange(8))
    assert model.entered.wait(10)
    attached = batcher.submit(np.array([3, 4, 50]))  # two windows of the failing batch
    wait_until(lambda: batcher.stats().shared == 2, 10, "2 windows shared with the failing batch")
    model.release.set()
    for f in (first, attached):
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=10)
    # the batcher goes on; the failed windows are computed afresh when asked again
    check(np.arange(8), batcher.submit(np.arange(8)).result(timeout=10))
    batcher.close()


def test_hidden_states_are_computed_only_for_batches_that_want_them() -> None:
    model = FakeModel()
    batcher = Batcher(model, batch_size=64, max_wait_s=0.05)
    plain, wanting = np.arange(0, 10), np.arange(5, 15)
    fp, fh = batcher.submit(plain), batcher.submit(wanting, hidden=True)
    check(plain, fp.result(timeout=10))  # no hidden states handed out unasked
    check(wanting, fh.result(timeout=10), hidden=True)
    # one batch computed the shared windows once, with hidden states for both requests
    assert sorted(np.concatenate(model.calls).tolist()) == list(range(15))
    assert model.hidden_calls == [True]
    # without a request for them no batch computes them
    check(np.arange(20, 30), batcher.submit(np.arange(20, 30)).result(timeout=10))
    batcher.close()
    assert model.hidden_calls == [True, False]


def test_recent_windows_without_hidden_states_are_computed_again_for_them() -> None:
    model = FakeModel()
    batcher = Batcher(model, batch_size=16, max_wait_s=0.0)
    idx = np.arange(8)
    check(idx, batcher.submit(idx).result(timeout=10))
    check(idx, batcher.submit(idx, hidden=True).result(timeout=10), hidden=True)
    # now recent with hidden states: both kinds of request are served from the LRU
    check(idx, batcher.submit(idx, hidden=True).result(timeout=10), hidden=True)
    check(idx, batcher.submit(idx).result(timeout=10))
    batcher.close()
    assert model.hidden_calls == [False, True]
    assert batcher.stats().recent_hits == 16


def test_windows_in_flight_without_hidden_states_are_computed_again_for_them() -> None:
    model = GatedModel()
    batcher = Batcher(model, batch_size=8, max_wait_s=0.0, recent_bytes=0)
    first = batcher.submit(np.arange(8))
    assert model.entered.wait(10)
    shares = batcher.submit(np.arange(0, 4))  # in flight, no hidden states needed: shared
    wants = batcher.submit(np.arange(4, 12), hidden=True)  # four windows in flight without
    wait_until(lambda: batcher.stats().shared == 4, 10, "4 windows shared with the first batch")
    model.release.set()
    check(np.arange(8), first.result(timeout=10))
    check(np.arange(4, 12), wants.result(timeout=10), hidden=True)
    check(np.arange(0, 4), shares.result(timeout=10))
    batcher.close()
    assert [c.tolist() for c in model.calls] == [list(range(8)), list(range(4, 12))]
    assert model.hidden_calls == [False, True]


def test_a_batcher_told_to_always_compute_hidden_states_does() -> None:
    model = FakeModel()
    seen: list[bool] = []
    batcher = Batcher(
        model,
        batch_size=8,
        max_wait_s=0.0,
        hidden=True,
        on_batch=lambda idx, labels, n: seen.append(labels.hidden is not None),
    )
    check(np.arange(5), batcher.submit(np.arange(5)).result(timeout=10))  # not handed out
    batcher.close()
    assert model.hidden_calls == [True] and seen == [True]
