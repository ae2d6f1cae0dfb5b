"""Shard plan: property tests over arbitrary sizes, plus the documented rules on small cases."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stkd_dist.data.plan import Block, ShardPlan, make_blocks, make_plan
from stkd_dist.errors import InputError

PROPS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def plan_args(draw):
    world_size = draw(st.integers(1, 8))
    count = draw(st.integers(world_size, 400))
    step = draw(st.integers(1, 3))
    start = draw(st.integers(0, 60))
    return {
        "windows": range(start, start + count * step, step),
        "chunk_steps": draw(st.integers(1, 120)),
        "world_size": world_size,
        "epoch": draw(st.integers(0, 5)),
        "seed": draw(st.integers(0, 2**16)),
        "batch_size": draw(st.integers(1, 64)),
        "shuffle": draw(st.booleans()),
    }


def make(args: dict) -> ShardPlan:
    a = dict(args)
    return make_plan(a.pop("windows"), a.pop("chunk_steps"), a.pop("world_size"), **a)


@PROPS
@given(plan_args())
def test_plan_properties(args):
    plan = make(args)
    windows, cs = args["windows"], args["chunk_steps"]
    # exactly-once coverage of the real windows
    seen = [w for r in range(plan.world_size) for w in plan.rank_windows(r)]
    assert sorted(seen) == list(windows)
    # equal batch counts and equal per-batch sizes on every rank
    lengths = {len(r.windows) + r.padding for r in plan.ranks}
    assert len(lengths) == 1
    longest = max(len(r.windows) for r in plan.ranks)
    assert lengths == {longest}
    assert plan.num_batches == math.ceil(longest / args["batch_size"])
    block_sizes = []
    all_blocks: list[Block] = []
    for shard in plan.ranks:
        assert len(shard.windows) >= 1
        # padding repeats only the rank's own windows
        assert set(shard.padding_windows()) <= set(shard.windows)
        idx, valid = shard.entries()
        assert valid.sum() == len(shard.windows) and len(idx) == plan.samples_per_rank
        # the rank sees its blocks one after the other; each block lies in one chunk
        pos = 0
        for b in shard.blocks:
            assert b.start // cs == b.last // cs == b.chunk
            assert sorted(shard.windows[pos : pos + len(b)]) == list(b.windows)
            pos += len(b)
            block_sizes.append(len(b))
        assert pos == len(shard.windows)
        all_blocks.extend(shard.blocks)
    # blocks of different ranks are disjoint and together tile the windows
    assert sum(len(b) for b in all_blocks) == len(windows)
    assert len({w for b in all_blocks for w in b.windows}) == len(windows)
    # at least min(4W, windows) blocks, unless chunks alone give more
    assert len(all_blocks) >= min(4 * plan.world_size, len(windows))
    # greedy balance: ranks differ by at most one block
    counts = [len(r.windows) for r in plan.ranks]
    assert max(counts) - min(counts) <= max(block_sizes)
    # determinism and JSON round trip
    assert make(args).to_json() == plan.to_json()
    assert ShardPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@PROPS
@given(plan_args())
def test_order_changes_across_epochs(args):
    args = {**args, "shuffle": True}
    orders = set()
    for epoch in range(20):
        plan = make({**args, "epoch": epoch})
        orders.add(tuple(tuple(plan.rank_windows(r)) for r in range(plan.world_size)))
    if len(args["windows"]) >= 2:  # then there are >= 2 blocks
        assert len(orders) > 1


@PROPS
@given(plan_args())
def test_no_shuffle_keeps_time_order(args):
    plan = make({**args, "shuffle": False})
    for r in range(plan.world_size):
        ws = plan.rank_windows(r)
        for b in plan.ranks[r].blocks:
            i = ws.index(b.start)
            assert ws[i : i + len(b)] == list(b.windows)
    if plan.world_size == 1:
        assert plan.rank_windows(0) == list(args["windows"])


def test_blocks_follow_chunks_and_subdivide():
    # 100 windows over chunks of 30 steps: chunk-blocks [0,30) [30,60) [60,90) [90,100)
    blocks = make_blocks(range(100), 30, 1)
    assert [(b.chunk, b.start, b.stop) for b in blocks] == [
        (0, 0, 30),
        (1, 30, 60),
        (2, 60, 90),
        (3, 90, 100),
    ]
    # world size 2 wants >= 8 blocks: each chunk-block splits into near-equal parts (<= 12)
    sub = make_blocks(range(100), 30, 8)
    assert len(sub) >= 8
    assert all(b.start // 30 == b.last // 30 for b in sub)
    assert max(len(b) for b in sub) <= 12
    assert sorted(w for b in sub for w in b.windows) == list(range(100))


def test_padding_example():
    # 10 windows in one chunk, 3 ranks: min(12, 10) = 10 one-window blocks dealt 4/3/3
    plan = make_plan(range(10), 100, 3, batch_size=4, shuffle=False)
    counts = [len(r.windows) for r in plan.ranks]
    assert sum(counts) == 10 and max(counts) == 4
    assert plan.num_batches == 1
    for shard in plan.ranks:
        assert len(shard.windows) + shard.padding == 4
        if shard.padding:
            assert shard.padding_windows()[0] == shard.windows[-1]


def test_errors():
    with pytest.raises(InputError, match="fewer than the world size 4"):
        make_plan(range(3), 10, 4)
    with pytest.raises(InputError, match="positive integer") as e:
        make_plan(range(30), 10, 0)
    assert e.value.where == "world_size"
    with pytest.raises(InputError, match="positive integer"):
        make_plan(range(30), 10, 1, batch_size=0)
    with pytest.raises(InputError, match="positive integer"):
        make_plan(range(30), 0, 1)
    with pytest.raises(InputError, match="increasing range"):
        make_plan([1, 2, 3], 10, 1)  # type: ignore[arg-type]
    plan = make_plan(range(30), 10, 2)
    with pytest.raises(InputError, match=r"rank 2 is outside 0\.\.1"):
        plan.rank_windows(2)
    with pytest.raises(InputError, match="format"):
        ShardPlan.from_json({**plan.to_json(), "format": 99})
    bad = plan.to_json()
    bad["ranks"][0]["padding"] += 1
    with pytest.raises(InputError, match="equal padded lengths"):
        ShardPlan.from_json(bad)
