"""Shard plan: property tests over arbitrary sizes, plus the documented rules on small cases."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stkd_dist.data.plan import (
    Block,
    RankShard,
    RankWindows,
    ShardPlan,
    make_blocks,
    make_plan,
)
from stkd_dist.errors import InputError

PROPS = settings(max_examples=80, deadline=None, derandomize=True)
FEW = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def plan_args(draw, max_world: int = 256, max_windows: int = 3000):
    """Random sizes, strides, chunkings (also chunks shorter than the stride) and world sizes."""
    world_size = draw(st.integers(1, max_world))
    count = draw(st.integers(world_size, max(world_size, max_windows)))
    step = draw(st.integers(1, 4))
    start = draw(st.integers(0, 300))
    return {
        "windows": range(start, start + count * step, step),
        "chunk_steps": draw(st.one_of(st.integers(1, 8), st.integers(1, 2600))),
        "world_size": world_size,
        "epoch": draw(st.integers(0, 5)),
        "seed": draw(st.integers(0, 2**16)),
        "batch_size": draw(st.integers(1, 64)),
        "shuffle": draw(st.booleans()),
    }


def _bounds(windows: range) -> tuple[int, int, int]:
    return windows.start, windows.stop, windows.step


def make(args: dict) -> ShardPlan:
    a = dict(args)
    return make_plan(a.pop("windows"), a.pop("chunk_steps"), a.pop("world_size"), **a)


def n_chunks(windows: range, chunk_steps: int) -> int:
    """Time chunks that hold at least one window start."""
    return np.unique(np.arange(*_bounds(windows)) // chunk_steps).size


def assert_blocks_tile(plan: ShardPlan, windows: range) -> None:
    """The blocks of all ranks tile ``windows`` exactly once (checked on blocks, O(blocks))."""
    blocks = sorted((b for r in plan.ranks for b in r.blocks), key=lambda b: b.start)
    assert blocks[0].start == windows.start and blocks[-1].last == windows[-1]
    for a, b in itertools.pairwise(blocks):
        assert a.step == b.step == windows.step and len(a) > 0
        assert b.start == a.stop  # contiguous, no gap, no overlap
    assert sum(len(b) for b in blocks) == len(windows)


@PROPS
@given(plan_args())
def test_plan_properties(args):
    plan = make(args)
    windows, cs, world = args["windows"], args["chunk_steps"], args["world_size"]
    n = len(windows)
    # exactly once: every window of the split in exactly one rank, once
    seen = np.concatenate([r.window_array() for r in plan.ranks])
    assert seen.size == n and np.array_equal(np.sort(seen), np.arange(*_bounds(windows)))
    assert_blocks_tile(plan, windows)
    # exact balance: floor(n/W) or ceil(n/W), the longer ranks first
    q, rem = divmod(n, world)
    assert [r.count for r in plan.ranks] == [q + 1] * rem + [q] * (world - rem)
    # equal batch counts and equal per-batch sizes on every rank
    assert {r.count + r.padding for r in plan.ranks} == {plan.samples_per_rank}
    assert plan.samples_per_rank == math.ceil(n / world)
    assert plan.num_batches == math.ceil(plan.samples_per_rank / args["batch_size"])
    # padding at most W - 1 per epoch, at most one entry per rank
    assert plan.total_padding == world * plan.samples_per_rank - n <= world - 1
    assert all(r.padding <= 1 for r in plan.ranks)
    # chunk alignment: every block within one time chunk
    for shard in plan.ranks:
        for b in shard.blocks:
            assert b.start // cs == b.last // cs == b.chunk
    # bounded state: at least min(4W, n) blocks to shuffle, fewer than chunks + min(4W, n) + W
    chunks, target = n_chunks(windows, cs), min(4 * world, n)
    assert target <= plan.num_blocks < chunks + target + world
    if chunks >= target:  # no subdivision: only the splits at the W - 1 rank boundaries
        assert plan.num_blocks <= chunks + world - 1
    # determinism, JSON round trip with and without the windows listed
    again = make(args)
    assert again == plan and again.to_json(windows=True) == plan.to_json(windows=True)
    assert ShardPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert ShardPlan.from_json(json.loads(json.dumps(plan.to_json(windows=True)))) == plan


@PROPS
@given(plan_args(max_world=32, max_windows=600), st.data())
def test_rank_sequences_are_lazy_and_consistent(args, data):
    plan = make(args)
    rank = data.draw(st.integers(0, plan.world_size - 1))
    shard = plan.ranks[rank]
    ws = shard.windows
    assert isinstance(ws, RankWindows)
    full = list(ws)  # block by block
    assert len(full) == len(ws) == shard.count
    assert list(reversed(ws)) == full[::-1]
    assert ws == full and ws == tuple(full) and ws.array().tolist() == full
    # each block's windows lie in that block, in rank order, block after block
    pos = 0
    for b, got in ws.iter_blocks():
        assert sorted(got.tolist()) == list(b.windows)
        assert full[pos : pos + len(b)] == got.tolist()
        pos += len(b)
    assert pos == len(full)
    # any slice or suffix is derived without the rest and equals the full sequence's
    lo = data.draw(st.integers(0, len(full)))
    hi = data.draw(st.integers(lo, len(full)))
    assert ws[lo:hi] == full[lo:hi] == shard.window_array(lo, hi).tolist()
    assert ws[::3] == full[::3]
    if lo < len(full):
        assert ws[lo] == full[lo] and ws[lo - len(full)] == full[lo]
    assert ws[-1] == full[-1] and full[0] in ws and (max(full) + 1) not in ws
    # entries: real windows, then padding repeating the last window, flagged invalid
    idx, valid = shard.entries()
    assert idx.tolist() == full + list(shard.padding_windows())
    assert valid.tolist() == [True] * len(full) + [False] * shard.padding
    assert list(shard.padding_windows()) == full[::-1][: shard.padding]
    e_lo = data.draw(st.integers(0, plan.samples_per_rank))
    e_hi = data.draw(st.integers(e_lo, plan.samples_per_rank))
    part, part_valid = shard.entries(e_lo, e_hi)
    assert part.tolist() == idx[e_lo:e_hi].tolist()
    assert part_valid.tolist() == valid[e_lo:e_hi].tolist()
    assert plan.rank_windows(rank) == full


@PROPS
@given(plan_args(max_world=16, max_windows=400))
def test_within_block_shuffle_is_seeded_per_block(args):
    args = {**args, "shuffle": True}
    plan = make(args)
    for r, shard in enumerate(plan.ranks):
        # (seed, epoch, rank, i) alone fixes block i's order: rebuilding the rank from any
        # suffix of its blocks gives the same order for those blocks
        k = len(shard.blocks) // 2
        ws = shard.windows
        assert isinstance(ws, RankWindows) and ws.key == (args["seed"], args["epoch"], r)
        for i in range(k, len(shard.blocks)):
            rng = np.random.default_rng([args["seed"], args["epoch"], r, i])
            b = shard.blocks[i]
            assert (
                ws.block_windows(i).tolist()
                == (b.start + rng.permutation(len(b)) * b.step).tolist()
            )


@FEW
@given(plan_args(max_world=16, max_windows=400))
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
    # time order: rank 0 has the first windows, rank 1 the next ones, ...
    seq = np.concatenate([r.window_array() for r in plan.ranks])
    assert np.array_equal(seq, np.arange(*_bounds(args["windows"])))
    for shard in plan.ranks:
        blocks = shard.blocks
        assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))


@FEW
@given(
    st.integers(10**5, 10**7),
    st.integers(1, 256),
    st.integers(64, 4096),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_large_plans_stay_small(n, world, chunk_steps, step, seed):
    windows = range(7, 7 + n * step, step)
    plan = make_plan(windows, chunk_steps, world, seed=seed, epoch=3, batch_size=64)
    assert_blocks_tile(plan, windows)
    q, rem = divmod(n, world)
    assert [r.count for r in plan.ranks] == [q + 1] * rem + [q] * (world - rem)
    assert plan.total_padding <= world - 1
    chunks = windows[-1] // chunk_steps - windows[0] // chunk_steps + 1  # step < chunk_steps
    assert plan.num_blocks < chunks + 4 * world + world
    for shard in plan.ranks:
        assert all(b.start // chunk_steps == b.last // chunk_steps == b.chunk for b in shard.blocks)
    # a suffix of the last rank, without its other windows
    last = plan.ranks[-1]
    tail = last.window_array(last.count - 5)
    assert tail.size == 5 and all(int(w) in last.windows for w in tail)


def test_suffix_derives_only_its_blocks(monkeypatch):
    # a rank of 250,000 windows in ~245 blocks: its last windows (a resumed epoch) and a loader's
    # entries of one block derive one block, not the 244 before it
    plan = make_plan(range(10**6), 1024, 4, seed=2, epoch=1)
    shard = plan.ranks[2]
    derived: list[int] = []
    original = RankWindows.block_windows

    def counting(self: RankWindows, i: int) -> np.ndarray:
        derived.append(i)
        return original(self, i)

    monkeypatch.setattr(RankWindows, "block_windows", counting)
    last = len(shard.blocks) - 1
    tail = shard.window_array(shard.count - 5)
    assert derived == [last] and tail.size == 5
    derived.clear()
    first = len(shard.blocks[0])
    idx, valid = shard.entries(first, first + len(shard.blocks[1]))
    assert derived == [1] and valid.all() and sorted(idx.tolist()) == list(shard.blocks[1].windows)
    derived.clear()
    assert shard.windows[0] == original(shard.windows, 0)[0] and derived == [0]


def test_blocks_follow_chunks_and_subdivide():
    # 100 windows over chunks of 30 steps: chunk-blocks [0,30) [30,60) [60,90) [90,100)
    blocks = make_blocks(range(100), 30, 1)
    assert [(b.chunk, b.start, b.stop) for b in blocks] == [
        (0, 0, 30),
        (1, 30, 60),
        (2, 60, 90),
        (3, 90, 100),
    ]
    # world size 2 wants >= 8 blocks: a chunk-block of m windows is cut into ceil(m * 8 / 100)
    # near-equal parts: 30 -> 10 10 10, 10 -> 10
    sub = make_blocks(range(100), 30, 8)
    assert [len(b) for b in sub] == [10] * 10
    assert all(b.start // 30 == b.last // 30 == b.chunk for b in sub)
    assert sorted(w for b in sub for w in b.windows) == list(range(100))
    # a stride longer than the chunks: one block per window, empty chunks skipped
    wide = make_blocks(range(3, 40, 10), 4, 1)
    assert [(b.chunk, b.start, b.stop, b.step) for b in wide] == [
        (0, 3, 13, 10),
        (3, 13, 23, 10),
        (5, 23, 33, 10),
        (8, 33, 43, 10),
    ]


def test_padding_example():
    # 10 windows in one chunk, 3 ranks: 10 one-window blocks cut 4/3/3 in time order
    plan = make_plan(range(10), 100, 3, batch_size=4, shuffle=False)
    assert [r.count for r in plan.ranks] == [4, 3, 3]
    assert [list(r.windows) for r in plan.ranks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan.num_batches == 1 and plan.total_padding == 2
    for shard in plan.ranks:
        assert shard.count + shard.padding == 4
        if shard.padding:
            assert shard.padding_windows() == (shard.windows[-1],)


def test_block_split_at_rank_boundary():
    # 9 chunk-blocks of 10 windows (>= 4 x 2 blocks: no subdivision), 45 windows per rank: the
    # fifth block straddles the cut and is split there, one half per rank, both in chunk 4
    plan = make_plan(range(0, 90), 10, 2, shuffle=False)
    assert [len(b) for b in plan.ranks[0].blocks] == [10, 10, 10, 10, 5]
    assert [len(b) for b in plan.ranks[1].blocks] == [5, 10, 10, 10, 10]
    assert plan.ranks[0].blocks[-1] == Block(4, 40, 45)
    assert plan.ranks[1].blocks[0] == Block(4, 45, 50)
    assert plan.total_padding == 0
    # 2 chunk-blocks (5 and 2 windows) < min(4 x 2, 7): one-window sub-blocks, cut 4 / 3
    small = make_plan(range(7), 5, 2, shuffle=False)
    assert [b.chunk for b in small.ranks[0].blocks] == [0, 0, 0, 0]
    assert [b.chunk for b in small.ranks[1].blocks] == [0, 1, 1]
    assert [r.padding for r in small.ranks] == [0, 1]


def test_pinned_order():
    # the derivation is part of the contract (teacher servers recompute it, resumes rely on it):
    # changing it silently would make a student and its teacher disagree
    plan = make_plan(range(40), 10, 2, seed=1, epoch=2, batch_size=8)
    assert [[b.to_json() for b in r.blocks] for r in plan.ranks] == [
        [[3, 30, 35, 1], [0, 0, 5, 1], [3, 35, 40, 1], [2, 25, 30, 1]],
        [[0, 5, 10, 1], [2, 20, 25, 1], [1, 15, 20, 1], [1, 10, 15, 1]],
    ]
    assert plan.rank_windows(0)[:10] == [34, 31, 30, 33, 32, 3, 0, 2, 4, 1]
    assert plan.rank_windows(1)[-5:] == [13, 12, 14, 11, 10]


def test_explicit_windows_and_validation():
    # a hand-made shard with an explicit order keeps it (loaders accept any plan)
    shard = RankShard((Block(1, 40, 43), Block(3, 120, 121)), (41, 40, 42, 120), 4)
    assert shard.windows == (41, 40, 42, 120)
    assert shard.padding_windows() == (120, 42, 40, 41)
    assert shard.entries(3, 6)[0].tolist() == [120, 120, 42]
    assert shard.last_window == 120
    with pytest.raises(InputError, match="lists 3 windows for blocks of 4"):
        RankShard((Block(1, 40, 43), Block(3, 120, 121)), (41, 40, 42), 0)
    other = RankWindows((Block(0, 0, 3),), None)
    with pytest.raises(InputError, match="other blocks"):
        RankShard((Block(0, 0, 4),), other, 0)


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
        ShardPlan.from_json({**plan.to_json(), "format": 1})
    bad = plan.to_json()
    bad["ranks"][0]["padding"] += 1
    with pytest.raises(InputError, match="equal padded lengths"):
        ShardPlan.from_json(bad)
    listed = plan.to_json(windows=True)
    listed["ranks"][1]["windows"] = listed["ranks"][1]["windows"][::-1]
    with pytest.raises(InputError, match="not the ones its blocks"):
        ShardPlan.from_json(listed)
    counted = plan.to_json()
    counted["ranks"][0]["count"] += 1
    with pytest.raises(InputError, match="count"):
        ShardPlan.from_json(counted)
    with pytest.raises(IndexError):
        plan.ranks[0].windows[15]
