"""Re-dealing an epoch to another world size: each window once, exact balance, lazy state.

The reference is independent of :mod:`stkd_dist.data.regroup`: the old ranks' window lists are
materialised, their unread tails concatenated and cut with ``np.array_split`` (which gives the
first ``n mod W`` parts one window more, the plan's balance rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stkd_dist.data.loader import make_loader
from stkd_dist.data.plan import make_plan
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.regroup import dealt_windows, regroup_plan, resume_plan, windows_left
from stkd_dist.data.windows import WindowSpec
from stkd_dist.errors import InputError
from stkd_dist.storage import open_store


def reference(old_lists: list[list[int]], steps: int, batch: int, world: int) -> list[list[int]]:
    tails = [np.asarray(ws[steps * batch :], dtype=np.int64) for ws in old_lists]
    return [part.tolist() for part in np.array_split(np.concatenate(tails), world)]


CASES = [
    # windows, chunk steps, old world, batch, steps, new world
    (range(0, 1000), 64, 3, 16, 5, 2),
    (range(0, 1000), 64, 2, 16, 7, 3),
    (range(12, 2000, 3), 50, 4, 8, 20, 1),
    (range(0, 101), 7, 3, 5, 6, 5),
    (range(0, 400), 400, 2, 32, 1, 7),  # one chunk: sub-blocks only
]


@pytest.mark.parametrize(("windows", "chunk", "old", "batch", "steps", "new"), CASES)
def test_the_rest_is_dealt_by_the_plans_rules(windows, chunk, old, batch, steps, new):
    plan = make_plan(windows, chunk, old, epoch=3, seed=11, batch_size=batch)
    old_lists = [list(plan.rank(r).windows) for r in range(old)]
    again = regroup_plan(plan, steps, new)
    expect = reference(old_lists, steps, batch, new)
    assert [list(again.rank(r).windows) for r in range(new)] == expect
    assert again.regroups == ((old, steps),) and again.world_size == new

    # every window of the epoch exactly once: the steps done before, then the new deal
    done = [w for ws in old_lists for w in ws[: steps * batch]]
    assert sorted(done + dealt_windows(again).tolist()) == list(windows)
    # equal batch counts: the longest rank's windows, the others padded to it by one entry
    longest = max(len(e) for e in expect)
    assert {r.count + r.padding for r in again.ranks} == {longest}
    assert again.num_batches == -(-longest // batch)
    # O(ranks) pieces, never one per window: the re-deal cuts at most old + new - 1 times
    assert sum(len(r.windows.pieces) for r in again.ranks) <= old + new - 1


def test_an_epoch_re_dealt_twice_is_rebuilt_from_its_deals():
    windows = range(0, 1500)
    plan = make_plan(windows, 64, 3, epoch=1, seed=2, batch_size=16)
    first = regroup_plan(plan, 6, 2)
    second = regroup_plan(first, 4, 4)
    lists = [list(plan.rank(r).windows)[: 6 * 16] for r in range(3)]
    lists += [list(first.rank(r).windows)[: 4 * 16] for r in range(2)]
    seen = [w for ws in lists for w in ws] + dealt_windows(second).tolist()
    assert sorted(seen) == list(windows)
    rebuilt = resume_plan(windows, 64, 4, [(3, 6), (2, 4)], epoch=1, seed=2, batch_size=16)
    assert rebuilt.regroups == second.regroups == ((3, 6), (2, 4))
    for a, b in zip(rebuilt.ranks, second.ranks, strict=True):
        assert a.window_array().tolist() == b.window_array().tolist()
    # and with no regroups, resume_plan is the plan
    assert resume_plan(windows, 64, 3, epoch=1, seed=2, batch_size=16) == plan


def test_bad_re_deals_are_refused():
    plan = make_plan(range(0, 100), 10, 2, batch_size=10)  # 5 steps a rank
    with pytest.raises(InputError, match=r"after step 1\.\.4, not 5"):
        regroup_plan(plan, 5, 3)
    with pytest.raises(InputError, match=r"after step 1\.\.4, not 0"):
        regroup_plan(plan, 0, 3)
    # after step 4 each rank has 10 windows left: 20 in all, fewer than 30 workers
    with pytest.raises(InputError, match="20 windows left after step 4, fewer than the 30"):
        regroup_plan(plan, 4, 30)
    with pytest.raises(InputError, match="re-dealt plan"):
        type(plan).from_json(regroup_plan(plan, 2, 3).to_json())


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_re_dealt_loader_reads_exactly_the_rest(make_store, prefetch):
    path = make_store(steps=500, nodes=3, channels=2, chunk_steps=40, missing=0.1, seed=4)
    reader = WindowReader(open_store(path), WindowSpec(input_steps=5, horizon=3))
    old, new, batch, steps = 3, 2, 16, 4
    done: list[int] = []
    for rank in range(old):
        loader = make_loader(reader, "train", old, rank, epoch=1, seed=9, batch_size=batch)
        for i, b in enumerate(loader):
            if i == steps:
                break
            done.extend(b.index[b.valid].tolist())
    seen: list[int] = []
    lengths = set()
    for rank in range(new):
        loader = make_loader(
            reader,
            "train",
            new,
            rank,
            epoch=1,
            seed=9,
            batch_size=batch,
            regroups=((old, steps),),
            prefetch=prefetch,
        )
        batches = list(loader)
        lengths.add(len(batches))
        idx, valid = loader.shard.entries()
        pos = 0
        for b in batches:
            # the batch holds the data of its windows, exactly as random access reads them
            want = reader.batch(idx[pos : pos + b.size], valid[pos : pos + b.size])
            for name, x, y in zip(b._fields, b, want, strict=True):
                assert torch.equal(x, y), name
            pos += b.size
        seen.extend(int(i) for b in batches for i in b.index[b.valid])
    assert len(lengths) == 1  # the new ranks step in lockstep
    assert sorted(done + seen) == list(reader.windows("train"))


@pytest.mark.parametrize(("windows", "chunk", "old", "batch", "steps", "new"), CASES)
def test_windows_left_counts_the_rest(windows, chunk, old, batch, steps, new):
    plan = make_plan(windows, chunk, old, epoch=3, seed=11, batch_size=batch)
    old_lists = [list(plan.rank(r).windows) for r in range(old)]
    left = sum(len(part) for part in reference(old_lists, steps, batch, 1))
    assert windows_left(plan, steps) == left
    # the re-dealt plan holds exactly those windows, none trained yet
    again = regroup_plan(plan, steps, new)
    assert windows_left(again, 0) == len(dealt_windows(again)) == left


def test_a_plan_re_deals_to_a_world_size_iff_enough_windows_are_left():
    plan = make_plan(range(0, 100), 10, 2, batch_size=10)  # 5 steps a rank, 50 windows each
    for steps in range(1, 5):
        left = windows_left(plan, steps)
        assert left == 2 * (50 - 10 * steps)
        regroup_plan(plan, steps, left)  # one window a rank: re-dealt
        with pytest.raises(InputError, match="fewer than the"):
            regroup_plan(plan, steps, left + 1)
