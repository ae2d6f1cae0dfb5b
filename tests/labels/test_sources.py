"""Soft-label sources of student workers: parsing, checks, caches, streams and ensembles.

Real Zarr stores and label caches on disk, real teacher checkpoints and a real gRPC server on
127.0.0.1 (in-process); no Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from stkd_dist.checkpoint import TrainState, save_checkpoint
from stkd_dist.config import Config, DataSection, RunSection
from stkd_dist.data.loader import make_loader
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError, InputError, StoreError
from stkd_dist.labels.sources import open_label_source
from stkd_dist.labels.teachers import (
    LabelSpec,
    TeacherSpec,
    parse_labels,
    parse_teacher,
    resolve_teachers,
)
from stkd_dist.models import build_forecaster
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientOptions, LabelMismatchError
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import MICRO_BATCH, load_teacher
from stkd_dist.storage import open_store

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Env:
    store: Path
    fingerprint: str
    reader: WindowReader
    ckpt: dict[str, Path]
    cache: dict[str, Path]
    val_mae: dict[str, float]


def _teacher(root: Path, store_path: Path, name: str, seed: int, val_mae: float, **kw) -> Path:
    store = open_store(store_path)
    cfg = Config(run=RunSection(name=name), data=DataSection(dataset=str(store_path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(seed)
    model = build_forecaster(
        "stgnn",
        reader.dims,
        adjacency=store.adjacency(),
        target_scale=reader.target_scale(),
        residual_channels=4,
        dilation_channels=4,
        skip_channels=8,
        end_channels=8,
        blocks=1,
        **kw,
    )
    info = save_checkpoint(
        root / name,
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": val_mae},
        state=TrainState(epoch=0),
    )
    return info.path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    from tests.conftest import random_store

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labels")
    store_path = random_store(root / "ds.zarr", steps=300, nodes=5, chunk_steps=64)
    store = open_store(store_path)
    cfg = Config(data=DataSection(dataset=str(store_path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    maes = {"a": 2.0, "b": 6.0, "s": 3.0}
    ckpt = {
        "a": _teacher(root, store_path, "ta", 1, maes["a"]),
        "b": _teacher(root, store_path, "tb", 2, maes["b"]),
        "s": _teacher(root, store_path, "ts", 3, maes["s"], spread=True),
    }
    cache = {}
    for key, path in ckpt.items():
        cache[key] = root / f"cache-{key}.zarr"
        precompute_labels(load_teacher(path, store_path), cache[key], ["train"], batch_size=50)
    return Env(store_path, store.fingerprint, reader, ckpt, cache, maes)


@pytest.fixture
def server(env: Env) -> Iterator[TeacherServer]:
    srv = TeacherServer(load_teacher(env.ckpt["a"], env.store), ServerConfig(batch_size=7))
    srv.start()
    yield srv
    srv.stop()


def _spec(env: Env, teachers: tuple[TeacherSpec, ...], **kw) -> LabelSpec:
    resolved = resolve_teachers(
        teachers,
        fingerprint=env.fingerprint,
        window_shape=(12, 5, 2),
        windows=env.reader.windows("train"),
        spread=kw.get("spread", False),
        client=kw.get("client", ClientOptions()),
    )
    return LabelSpec(resolved, env.fingerprint, **kw)


def _epoch(source, reader: WindowReader, rank: int = 0, world: int = 2, epoch: int = 0):
    """Labels of every batch of one rank's epoch, like a student worker takes them."""
    loader = make_loader(reader, "train", world, rank, epoch=epoch, seed=3, batch_size=16)
    source.begin_epoch(np.asarray(loader.plan.rank_windows(rank)))
    out = []
    for b in loader:
        labels = source.labels_for(b.index, b.valid)
        out.append((b, labels.prediction, labels.spread))
    return out, source.end_epoch(), loader


def test_parse_teacher_and_labels_arguments(tmp_path: Path) -> None:
    assert parse_teacher("127.0.0.1:5,127.0.0.1:6") == TeacherSpec(
        "stream", "127.0.0.1:5,127.0.0.1:6"
    )
    assert parse_teacher("ray:3") == TeacherSpec("replicas", replicas=3)
    assert parse_teacher("ray:stkd-teacher").kind == "stream"  # a prefix of named actors
    assert parse_labels(f"cache:{tmp_path}/x.zarr").location == str(tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="HOST:PORT") as e:
        parse_teacher("localhost")
    assert e.value.where == "--teacher"
    with pytest.raises(ConfigError, match="cache:PATH") as e:
        parse_labels("/some/cache.zarr")
    assert e.value.where == "--labels"
    with pytest.raises(ConfigError, match="at least 1 replica"):
        parse_teacher("ray:0")


def test_cache_and_stream_give_bitwise_equal_labels_exactly_once(
    env: Env, server: TeacherServer
) -> None:
    # a server batching 7 windows at a time, and a cache filled 50 at a time: the teacher runs in
    # fixed micro-batches, so both give the very same bits for every window
    assert MICRO_BATCH not in (7, 50)
    options = ClientOptions(max_message_bytes=8192, prefetch=2)
    streamed = open_label_source(
        _spec(env, (TeacherSpec("stream", server.address),), client=options)
    )
    cached = open_label_source(_spec(env, (TeacherSpec("cache", str(env.cache["a"])),)))
    for source in (streamed, cached):
        assert source.spec.teachers[0].version.startswith("ta-e0-")
        assert source.spec.teachers[0].val_mae == env.val_mae["a"]
    s_batches, s_records, loader = _epoch(streamed, env.reader, rank=1)
    c_batches, c_records, _ = _epoch(cached, env.reader, rank=1)
    assert len(s_batches) == len(c_batches) == loader.plan.num_batches
    padded = 0
    for (batch, sp, _), (_, cp, _) in zip(s_batches, c_batches, strict=True):
        assert sp.shape == (batch.size, 12, 5, 2)
        assert torch.equal(sp, cp)
        assert not sp[~batch.valid].any()  # padding rows are zeros
        padded += int((~batch.valid).sum())
    # every window of the rank's plan was asked for and delivered once, in several chunks
    plan_windows = len(loader.plan.rank_windows(1))
    (rec,) = s_records
    assert rec["requested"] == rec["delivered"] == plan_windows
    assert rec["chunks"] > 3 and rec["reconnects"] == 0
    assert rec["endpoints"] == [server.address]
    assert c_records[0]["delivered"] == plan_windows
    # the labels are the teacher's outputs on those windows
    direct = load_teacher(env.ckpt["a"], env.store)
    batch, sp, _ = s_batches[0]
    ok = batch.valid.numpy()
    np.testing.assert_array_equal(
        sp.numpy()[ok], direct.predict(batch.index.numpy()[ok]).prediction
    )
    streamed.close()
    cached.close()


@pytest.mark.parametrize("rank", [0, 1])
def test_streaming_by_plan_gives_the_labels_of_the_rank_windows(
    env: Env, server: TeacherServer, rank: int
) -> None:
    """The student asks for its shard plan (a few integers); the server derives the same window
    sequence from it, including with a chunk length other than its own store's."""
    from stkd_dist.serving.client import PlanRequest

    options = ClientOptions(max_message_bytes=8192, prefetch=2)
    streamed = open_label_source(
        _spec(env, (TeacherSpec("stream", server.address),), client=options)
    )
    cached = open_label_source(_spec(env, (TeacherSpec("cache", str(env.cache["a"])),)))
    chunk = 40  # not the store's: the request carries it
    assert chunk != env.reader.store.chunks[0]
    plan = make_plan_for(env.reader, world=2, rank=rank, chunk_steps=chunk)
    windows = plan.rank(rank).window_array()
    request = PlanRequest(
        world_size=2, rank=rank, epoch=1, seed=3, batch_size=16, shuffle=True, chunk_steps=chunk
    )
    streamed.begin_epoch(windows, request)
    cached.begin_epoch(windows)
    index = torch.from_numpy(windows)
    valid = torch.ones(len(windows), dtype=torch.bool)
    sp = streamed.labels_for(index, valid).prediction
    cp = cached.labels_for(index, valid).prediction
    assert torch.equal(sp, cp)
    (rec,) = streamed.end_epoch()
    assert rec["requested"] == rec["delivered"] == len(windows)
    streamed.close()
    cached.close()


def make_plan_for(reader: WindowReader, world: int, rank: int, chunk_steps: int):
    from stkd_dist.data.plan import make_plan

    return make_plan(reader.windows("train"), chunk_steps, world, epoch=1, seed=3, batch_size=16)


def test_in_memory_cache_matches_on_demand_reads(env: Env) -> None:
    spec = _spec(env, (TeacherSpec("cache", str(env.cache["a"])),))
    a, _, _ = _epoch(open_label_source(spec), env.reader, epoch=1)
    b, _, _ = _epoch(open_label_source(spec, in_memory=True), env.reader, epoch=1)
    for (_, pa, _), (_, pb, _) in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("rule", ["mean", "inverse_error"])
def test_ensemble_combines_teachers_by_rule(env: Env, rule: str) -> None:
    one = {
        k: _epoch(
            open_label_source(_spec(env, (TeacherSpec("cache", str(env.cache[k])),))), env.reader
        )[0]
        for k in ("a", "b")
    }
    teachers = (
        TeacherSpec("cache", str(env.cache["a"])),
        TeacherSpec("cache", str(env.cache["b"])),
    )
    spec = _spec(env, teachers, ensemble=rule)
    both, records, _ = _epoch(open_label_source(spec), env.reader)
    # weights: equal, or proportional to 1 / validation MAE (2.0 and 6.0 -> 0.75, 0.25)
    wa, wb = (0.5, 0.5) if rule == "mean" else (0.75, 0.25)
    assert spec.weights() == pytest.approx([wa, wb])
    for (_, pa, _), (_, pb, _), (_, pe, _) in zip(one["a"], one["b"], both, strict=True):
        torch.testing.assert_close(pe, wa * pa + wb * pb, rtol=1e-6, atol=1e-6)
    assert [r["teacher"] for r in records] == [f"cache:{env.cache['a']}", f"cache:{env.cache['b']}"]


def test_spread_is_combined_with_the_mixture_variance(env: Env) -> None:
    teachers = (
        TeacherSpec("cache", str(env.cache["s"])),
        TeacherSpec("cache", str(env.cache["s"])),
    )
    spec = _spec(env, teachers, spread=True)
    alone = _spec(env, teachers[:1], spread=True)
    both, _, _ = _epoch(open_label_source(spec), env.reader)
    single, _, _ = _epoch(open_label_source(alone), env.reader)
    for (b, pm, lv), (_, p1, l1) in zip(both, single, strict=True):
        ok = b.valid
        # two copies of one teacher: the same mean and the same variance
        torch.testing.assert_close(pm[ok], p1[ok])
        torch.testing.assert_close(lv[ok], l1[ok], rtol=1e-5, atol=1e-5)


def test_teachers_that_do_not_fit_are_refused(
    env: Env, server: TeacherServer, tmp_path: Path
) -> None:
    windows = env.reader.windows("train")
    base = {"fingerprint": env.fingerprint, "window_shape": (12, 5, 2), "windows": windows}
    with pytest.raises(ConfigError, match="student predicts") as e:
        resolve_teachers(
            (TeacherSpec("cache", str(env.cache["a"])),), **{**base, "window_shape": (3, 5, 2)}
        )
    assert e.value.where == f"cache:{env.cache['a']}"
    with pytest.raises(ConfigError, match=r"window .*settings"):
        resolve_teachers(
            (TeacherSpec("stream", server.address),),
            **{**base, "windows": range(windows.start, windows.stop - 1)},
        )
    with pytest.raises(ConfigError, match="spread"):
        resolve_teachers((TeacherSpec("stream", server.address),), **base, spread=True)
    with pytest.raises(StoreError, match="dataset"):
        resolve_teachers(
            (TeacherSpec("cache", str(env.cache["a"])),), **{**base, "fingerprint": "0" * 16}
        )
    with pytest.raises(LabelMismatchError):
        resolve_teachers(
            (TeacherSpec("stream", server.address),), **{**base, "fingerprint": "0" * 16}
        )
    with pytest.raises(StoreError, match="no such label cache"):
        resolve_teachers((TeacherSpec("cache", str(tmp_path / "none.zarr")),), **base)
    # an incomplete cache: only 5 of the training windows filled
    teacher = load_teacher(env.ckpt["a"], env.store)
    part = LabelCache.create(tmp_path / "part.zarr", teacher.meta, ["train"])
    idx = np.asarray(windows)[:5]
    part.write(idx, teacher.predict(idx))
    with pytest.raises(StoreError, match=f"holds 5 of the {len(windows)} train windows"):
        resolve_teachers((TeacherSpec("cache", str(part.path)),), **base)


def test_inverse_error_needs_every_teacher_mae(env: Env) -> None:
    teachers = (
        TeacherSpec("cache", "x", version="v1", val_mae=1.0),
        TeacherSpec("cache", "y", version="v2"),
    )
    with pytest.raises(ConfigError, match="unknown for cache:y") as e:
        LabelSpec(teachers, env.fingerprint, ensemble="inverse_error").weights()
    assert e.value.where == "distill.ensemble"
    assert LabelSpec(teachers, env.fingerprint).weights() == [0.5, 0.5]
    with pytest.raises(ConfigError, match="needs a teacher"):
        LabelSpec((), env.fingerprint)


def test_a_window_missing_from_the_stream_is_an_error(env: Env, server: TeacherServer) -> None:
    source = open_label_source(_spec(env, (TeacherSpec("stream", server.address),)))
    windows = np.asarray(env.reader.windows("train"))
    source.begin_epoch(windows[:10])
    with pytest.raises(InputError, match="not in the rest of the label stream"):
        source.labels_for(torch.as_tensor(windows[10:12]), torch.ones(2, dtype=torch.bool))
    source.close()


def test_student_requests_are_checked_before_any_cluster_starts(env: Env, tmp_path: Path) -> None:
    from stkd_dist.config import load_config
    from stkd_dist.train.student import StudentRequest, train_student

    cache = TeacherSpec("cache", str(env.cache["a"]))
    with pytest.raises(ConfigError, match="name a teacher") as e:
        StudentRequest()
    assert e.value.where == "--teacher"
    with pytest.raises(ConfigError, match="without teachers"):
        StudentRequest(teachers=(cache,), distill=False)
    with pytest.raises(ConfigError, match="ray:N") as e:
        StudentRequest(teachers=(cache,), checkpoint="some-run")
    assert e.value.where == "--checkpoint"
    # a loss of class logits cannot use forecasts as soft labels: refused up front
    cfg = load_config("demo", [f"data.dataset={env.store}", "distill.loss=hinton"])
    with pytest.raises(ConfigError, match="teachers serve forecasts") as e:
        train_student(cfg, StudentRequest(teachers=(cache,)), storage=tmp_path)
    assert e.value.where == "distill.loss"
    assert not (tmp_path / "runs").exists()
