"""RankLoader and WindowIterableDataset: batches, padding, prefetch, chunk locality."""

from __future__ import annotations

import multiprocessing
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from stkd_dist.data import torch_dataset
from stkd_dist.data.loader import RankLoader, make_loader
from stkd_dist.data.plan import Block, RankShard, ShardPlan, make_plan
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.torch_dataset import WindowIterableDataset
from stkd_dist.data.windows import WindowSpec
from stkd_dist.errors import ConfigError, InputError, StoreError
from stkd_dist.storage import open_store

HERE = Path(__file__).resolve().parent


@pytest.fixture
def reader(make_store) -> WindowReader:
    path = make_store(steps=500, nodes=4, channels=2, chunk_steps=40, missing=0.1, seed=1)
    return WindowReader(open_store(path), WindowSpec(input_steps=5, horizon=3))


def assert_batches_equal(a, b) -> None:
    for name, ta, tb in zip(a._fields, a, b, strict=True):
        assert torch.equal(ta, tb), name


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize(("world_size", "split"), [(1, "train"), (3, "train"), (2, "test")])
def test_loader_equals_random_access(reader, prefetch, world_size, split):
    seen = []
    lengths = set()
    for rank in range(world_size):
        loader = make_loader(
            reader, split, world_size, rank, batch_size=16, epoch=2, prefetch=prefetch
        )
        idx, valid = loader.shard.entries()
        batches = list(loader)
        assert len(batches) == len(loader) == loader.plan.num_batches
        lengths.add(len(batches))
        pos = 0
        for (lo, hi), batch in zip(loader.plan.batch_bounds(), batches, strict=True):
            assert batch.size == hi - lo
            assert batch.index.tolist() == idx[lo:hi].tolist()
            assert_batches_equal(batch, reader.batch(idx[lo:hi], valid[lo:hi]))
            pos = hi
        assert pos == loader.plan.samples_per_rank
        seen.extend(int(i) for b in batches for i in b.index[b.valid])
    assert len(lengths) == 1
    assert sorted(seen) == list(reader.windows(split))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_a_resumed_epoch_yields_the_rest_of_the_uninterrupted_one(
    reader, prefetch, world_size, monkeypatch
):
    kw = dict(batch_size=7, epoch=1, prefetch=prefetch)
    for rank in range(world_size):
        full = list(make_loader(reader, "train", world_size, rank, **kw))
        for start in (1, len(full) // 2, len(full) - 1, len(full)):
            loader = make_loader(reader, "train", world_size, rank, start_batch=start, **kw)
            reads: list[tuple[int, int]] = []
            real = reader.store.read
            monkeypatch.setattr(
                reader.store,
                "read",
                lambda lo, hi, reads=reads, real=real: reads.append((lo, hi)) or real(lo, hi),
            )
            rest = list(loader)
            monkeypatch.undo()
            assert len(rest) == len(loader) == len(full) - start
            for a, b in zip(full[start:], rest, strict=True):
                assert_batches_equal(a, b)
            # the blocks wholly before the resumed batch are never read
            first = loader.start_entry
            before = [s for s in loader.segments if s.stop <= first and not s.random]
            assert not {(s.lo, s.hi) for s in before} & set(reads) or first == 0
            assert loader.start_window == min(first, loader.shard.count)
    with pytest.raises(InputError, match="start batch 99 is outside"):
        make_loader(reader, "train", start_batch=99, batch_size=100)


def test_shuffle_defaults(reader):
    train = make_loader(reader, "train")
    test = make_loader(reader, "test")
    assert train.plan.shuffle and not test.plan.shuffle
    assert test.shard.windows == tuple(reader.windows("test"))


def test_padding_beyond_last_block_uses_random_access(reader):
    # rank 1 is 4 windows short but its last block has a single window
    shards = (
        RankShard((Block(0, 0, 8),), tuple(range(8)), 0),
        RankShard((Block(1, 40, 43), Block(3, 120, 121)), (41, 40, 42, 120), 4),
    )
    plan = ShardPlan("train", 2, 0, 0, 3, True, 40, shards, 3)
    loader = RankLoader(reader, plan, 1)
    assert loader.segments[-1].random
    batches = list(loader)
    idx = torch.cat([b.index for b in batches]).tolist()
    valid = torch.cat([b.valid for b in batches]).tolist()
    assert idx == [41, 40, 42, 120, 120, 42, 40, 41]
    assert valid == [True] * 4 + [False] * 4
    assert [b.size for b in batches] == [3, 3, 2]
    for b in batches:
        assert not b.mask[~b.valid].any()
        assert_batches_equal(b, reader.batch(b.index.numpy(), b.valid.numpy()))


def test_early_stop_leaves_no_thread(reader):
    before = threading.active_count()
    loader = make_loader(reader, "train", batch_size=8)
    it = iter(loader)
    next(it)
    it.close()  # what a `break` out of a for loop does
    assert threading.active_count() == before


def test_read_error_surfaces(reader):
    # damage a chunk on disk after the store was opened: the prefetch thread's error reaches us
    chunk = reader.store.path / "values" / "c" / "5" / "0" / "0"
    chunk.write_bytes(b"not a chunk")
    loader = make_loader(reader, "train", batch_size=8, shuffle=False)
    with pytest.raises(StoreError, match="corrupted"):
        list(loader)


def test_plan_checks(reader, make_store):
    plan = make_plan(range(0, 900), 40, 1)  # windows beyond this 500-step series
    with pytest.raises(InputError, match="another dataset"):
        RankLoader(reader, plan, 0)
    with pytest.raises(InputError, match=r"rank 1 is outside"):
        make_loader(reader, "train", 1, 1)


def test_iterable_dataset_with_dataloader(reader):
    ds = WindowIterableDataset.for_split(reader, "train", 2, 1, batch_size=32, seed=5)
    dl = DataLoader(ds, batch_size=None, num_workers=0)
    got = list(dl)
    expected = list(make_loader(reader, "train", 2, 1, batch_size=32, seed=5))
    assert len(dl) == len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert_batches_equal(a, b)
    ds.set_epoch(1)
    again = list(dl)
    assert [b.index.tolist() for b in again] != [b.index.tolist() for b in got]
    # a rank's share changes with the epoch: it follows the plan of epoch 1
    epoch1 = make_loader(reader, "train", 2, 1, batch_size=32, seed=5, epoch=1)
    assert [b.index.tolist() for b in again] == [b.index.tolist() for b in epoch1]


def test_iterable_dataset_refuses_workers(reader, monkeypatch):
    ds = WindowIterableDataset.for_split(reader, "val")
    monkeypatch.setattr(torch_dataset, "get_worker_info", lambda: object())
    with pytest.raises(ConfigError, match="num_workers=0"):
        iter(ds)


@pytest.mark.integration
def test_two_ranks_in_two_processes_read_only_their_chunks(make_store, monkeypatch):
    path = make_store(steps=800, nodes=3, channels=2, chunk_steps=40, missing=0.05, seed=7)
    L, H, batch = 6, 6, 16
    monkeypatch.syspath_prepend(str(HERE))  # spawned children import rank_worker by name
    import rank_worker

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(rank_worker.run_rank, [(str(path), 2, r, L, H, batch) for r in (0, 1)])
    assert "rank_worker" in sys.modules

    reader = WindowReader(open_store(path), WindowSpec(input_steps=L, horizon=H))
    plan = make_plan(reader.windows("train"), 40, 2, epoch=1, batch_size=batch)
    total_chunks = 800 // 40
    real: list[int] = []
    for res in results:
        shard = plan.ranks[res["rank"]]
        expected = shard.chunks(40, L + H)
        # each rank touched exactly its blocks' chunks plus the halo, and not the rest
        assert res["values_chunks"] == expected
        assert res["mask_chunks"] == expected
        own = {b.chunk for b in shard.blocks}
        assert set(expected) <= own | {c + 1 for c in own}  # halo: at most the next chunk
        assert len(expected) < total_chunks
        assert res["num_batches"] == plan.num_batches
        real.extend(i for i, v in zip(res["indices"], res["valid"], strict=True) if v)
        assert [i for i, v in zip(res["indices"], res["valid"], strict=True) if v] == list(
            shard.windows
        )
    assert results[0]["sizes"] == results[1]["sizes"]
    # exact balance splits at most world_size - 1 = 1 block between the ranks: apart from that
    # block's chunk the blocks' own chunks are disjoint; otherwise only halo chunks are read by both
    own = [{b.chunk for b in plan.ranks[r].blocks} for r in (0, 1)]
    assert len(own[0] & own[1]) <= 1
    assert sorted(real) == list(reader.windows("train"))
    assert len(real) == len(set(real))
