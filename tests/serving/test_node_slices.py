"""Windows larger than the message limit on a real server and client (127.0.0.1): split along
the node axis, reassembled, delivered exactly once, resumed mid-window; the lower bound."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from stkd_dist.config import Config, DataSection
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError
from stkd_dist.models import build_forecaster
from stkd_dist.serving import codec, codec_slices
from stkd_dist.serving.client import (
    Backoff,
    ClientOptions,
    SoftLabelClient,
    TeacherRequestError,
)
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import Teacher
from stkd_dist.storage import open_store

pytestmark = pytest.mark.integration

FAST = Backoff(initial_s=0.01, max_s=0.05, max_attempts=6)
NODES = 2600  # one window's prediction: 12 x 2600 x 1 float32 = 124,800 bytes
SERVER_LIMIT = 65536  # the least a server may be configured with


@dataclass(frozen=True)
class Wide:
    teacher: Teacher
    fingerprint: str


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Wide:
    """A teacher on a graph whose windows are about twice the server's message limit."""
    from tests.conftest import random_store

    torch.set_num_threads(1)
    path = random_store(
        tmp_path_factory.mktemp("wide") / "wide.zarr", steps=120, nodes=NODES, channels=1
    )
    store = open_store(path)
    data = Config(data=DataSection(dataset=str(path))).data
    reader = WindowReader(store, data.window(), data.splits())
    torch.manual_seed(0)
    # a per-node linear teacher: cheap on 2600 nodes, and with a spread output
    model = build_forecaster("linear", reader.dims, target_scale=reader.target_scale(), spread=True)
    return Wide(Teacher(model, reader, "wide-e0-0123abcd"), store.fingerprint)


@pytest.fixture
def serve(wide: Wide) -> Iterator[Callable[..., TeacherServer]]:
    """``serve(**ServerConfig fields) -> started server`` of the wide teacher."""
    servers: list[TeacherServer] = []

    def make(**cfg: Any) -> TeacherServer:
        cfg.setdefault("max_message_bytes", SERVER_LIMIT)
        server = TeacherServer(wide.teacher, ServerConfig(drain_grace_s=0.5, **cfg))
        server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def _expected(teacher: Teacher, windows: list[int], spread: bool, dtype: str) -> list[np.ndarray]:
    """The teacher's labels of ``windows`` as they must arrive in wire ``dtype``."""
    got = teacher.predict(windows)
    assert got.spread is not None
    out = [got.prediction] + ([got.spread] if spread else [])
    if dtype == "float16":
        return [a.astype(np.float16).astype(np.float32) for a in out]
    return out


@pytest.mark.parametrize(
    ("client_limit", "spread", "dtype", "slices"),
    [
        (None, False, "float32", 2),  # the server's own limit: 124.8 KB windows in 64 KB messages
        (32768, True, "float32", 8),  # a client asking for less, with spread: 249.6 KB windows
        (16384, False, "float16", 5),  # half precision: 62.4 KB windows in 16 KB messages
    ],
)
def test_windows_larger_than_a_message_stream_exactly_once(
    serve: Callable[..., TeacherServer],
    wide: Wide,
    client_limit: int | None,
    spread: bool,
    dtype: str,
    slices: int,
) -> None:
    server = serve()
    window_bytes = 12 * NODES * 1 * (4 if dtype == "float32" else 2) * (1 + spread)
    limit = client_limit or SERVER_LIMIT
    assert window_bytes > 1.8 * limit
    wanted = [5, 0, 9, 5, 2, 30]  # out of order, and window 5 twice
    options = {} if client_limit is None else {"max_message_bytes": client_limit}
    with SoftLabelClient(
        [server.address], expected_fingerprint=wide.fingerprint, wire_dtype=dtype, **options
    ) as client:
        items = list(client.stream("train", wanted, spread=spread))
    # the consumer gets whole windows, each once, in the requested order
    assert [i.tolist() for i, _ in items] == [[w] for w in wanted]
    assert all(lab.prediction.shape == (1, 12, NODES, 1) for _, lab in items)
    expected = _expected(wide.teacher, wanted, spread, dtype)
    assert np.array_equal(np.concatenate([lab.prediction for _, lab in items]), expected[0])
    if spread:
        assert np.array_equal(np.concatenate([lab.spread for _, lab in items]), expected[1])
    else:
        assert all(lab.spread is None for _, lab in items)
    s = client.stats
    assert (s.windows, s.chunks, s.slices) == (6, 6, 6 * slices)
    assert s.bytes == 6 * window_bytes and s.reconnects == 0 and s.checksum_failures == 0
    # the server counted each window once, and sent each label byte once
    assert server.metrics.value("stkd_serve_windows_total", source="teacher") == 6
    assert server.metrics.value("stkd_serve_bytes_total") == 6 * window_bytes


def test_labels_for_joins_split_windows_to_batches(
    serve: Callable[..., TeacherServer], wide: Wide
) -> None:
    server = serve()
    with (
        SoftLabelClient([server.address], expected_fingerprint=wide.fingerprint) as client,
        client.stream("train", range(8)) as stream,
    ):
        for batch in ([0, 1, 2], [3, 4, 5, 6, 7]):
            got = stream.labels_for(torch.tensor(batch))
            pred, spread = got.prediction, got.spread
            assert spread is None and pred.shape == (len(batch), 12, NODES, 1)
            assert np.array_equal(pred.numpy(), wide.teacher.predict(batch).prediction)
        assert list(stream) == []


def _stub(server: TeacherServer) -> tuple[grpc.Channel, pb_grpc.TeacherServiceStub]:
    channel = grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 4 * 2**20)]
    )
    return channel, pb_grpc.TeacherServiceStub(channel)


def _request(wide: Wide, start: int, stop: int, **fields: Any) -> pb.LabelRequest:
    return pb.LabelRequest(
        dataset_fingerprint=wide.fingerprint,
        split="train",
        ranges=pb.WindowRanges(ranges=[pb.WindowRange(start=start, stop=stop, step=1)]),
        **fields,
    )


def test_slice_cursors_on_the_wire_are_resume_points(
    serve: Callable[..., TeacherServer], wide: Wide
) -> None:
    """Every slice but a window's last names the window's own position; resuming there starts
    the window again from node 0."""
    server = serve()
    channel, stub = _stub(server)
    # what is left of 64 KB after the headers, in node rows of 12 x 1 float32
    headers = codec.CHUNK_OVERHEAD_BYTES + codec.INDEX_BYTES + codec_slices.SLICE_FIELD_BYTES
    per_slice = (SERVER_LIMIT - headers) // 48
    with channel:
        messages = list(stub.StreamLabels(_request(wide, 10, 13), timeout=30))
        got = [
            (list(m.window_indices), m.node_start, m.node_stop, m.node_count, m.cursor, m.total)
            for m in messages
        ]
        assert got == [
            ([w], a, b, NODES, pos + (b == NODES), 3)
            for pos, w in enumerate(range(10, 13))
            for a, b in ((0, per_slice), (per_slice, NODES))
        ]
        assert all(m.ByteSize() <= SERVER_LIMIT for m in messages)
        # a client that lost the stream after the first slice of window 11 resumes at its cursor
        resumed = list(
            stub.StreamLabels(_request(wide, 10, 13, resume_cursor=got[2][4]), timeout=30)
        )
        assert [(list(m.window_indices), m.node_start) for m in resumed][:2] == [
            ([11], 0),
            ([11], per_slice),
        ]
        assert [m.SerializeToString() for m in resumed] == [
            m.SerializeToString() for m in messages[2:]
        ]


def test_stream_broken_mid_window_fails_over_without_loss_or_repetition(
    serve: Callable[..., TeacherServer], wide: Wide, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica a is stopped right after the client received the first 2 of the 4 slices of the
    third window; the client drops them and resumes that window from node 0 on replica b."""
    a, b = serve(), serve()
    per_window, received_first = 4, 2 * 4 + 2  # 32 KB messages: 4 slices of a 124.8 KB window
    got_them = threading.Event()
    decoded = {"n": 0}
    real_decode = codec.decode_chunk_bytes

    def counting(data: bytes) -> codec.DecodedChunk:
        chunk = real_decode(data)
        decoded["n"] += 1
        if decoded["n"] == received_first:
            assert chunk.nodes is not None and not chunk.nodes.last  # mid-window
            got_them.set()
        return chunk

    real_chunks = a.chunks

    def breaking(
        plan: Any, context: grpc.ServicerContext, *version: Any
    ) -> Iterator[codec.EncodedChunk]:
        for sent, message in enumerate(real_chunks(plan, context, *version), 1):
            yield message
            if sent == received_first:
                # the message has gone out; once the client has it, replica a dies
                assert got_them.wait(20)
                threading.Thread(target=a.stop, daemon=True).start()
                deadline = time.monotonic() + 20
                while context.is_active() and time.monotonic() < deadline:
                    time.sleep(0.01)
                return

    monkeypatch.setattr(codec, "decode_chunk_bytes", counting)
    monkeypatch.setattr(a, "chunks", breaking)
    wanted = list(range(20, 28))
    client = SoftLabelClient(
        [a.address, b.address],
        expected_fingerprint=wide.fingerprint,
        max_message_bytes=32768,
        backoff=FAST,
    )
    client.placement._next = 0  # ties go to replica a first
    with client:
        items = list(client.stream("train", wanted))
    assert [i.tolist() for i, _ in items] == [[w] for w in wanted]  # each window once
    assert np.array_equal(
        np.concatenate([lab.prediction for _, lab in items]),
        wide.teacher.predict(wanted).prediction,
    )
    s = client.stats
    assert s.reconnects == 1 and s.endpoints == {a.address, b.address}
    assert s.windows == len(wanted) and s.checksum_failures == 0
    # the two slices of the broken window were received, dropped and received again from b
    assert s.slices == per_window * len(wanted) + 2
    assert b.metrics.value("stkd_serve_windows_total", source="teacher") == len(wanted) - 2


def test_limit_below_one_node_row_is_invalid_argument(
    serve: Callable[..., TeacherServer], wide: Wide
) -> None:
    server = serve()
    minimum = codec_slices.min_message_bytes((12, NODES, 1), "float32", 2)
    channel, stub = _stub(server)
    with channel, pytest.raises(grpc.RpcError) as info:
        list(stub.StreamLabels(
            _request(wide, 0, 3, max_message_bytes=minimum - 1, outputs=[pb.PREDICTION, pb.SPREAD]),
            timeout=10,
        ))  # fmt: skip
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert details.startswith("max_message_bytes: ")
    assert f"a message limit of {minimum - 1} bytes" in details
    assert f"the minimum is {minimum} bytes" in details
    # the client reports it as a request error naming the code, the rule and the server
    with (
        SoftLabelClient(
            [server.address], expected_fingerprint=wide.fingerprint, max_message_bytes=100
        ) as client,
        pytest.raises(TeacherRequestError) as refused,
    ):
        list(client.stream("train", range(3)))
    err = refused.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.where == server.address
    minimum_pred = codec_slices.min_message_bytes((12, NODES, 1), "float32", 1)
    assert "INVALID_ARGUMENT: max_message_bytes: a message limit of 100 bytes" in err.message
    assert f"the minimum is {minimum_pred} bytes" in str(err)
    # and it survives pickling (Ray hands worker errors to the driver that way): it used to
    # fail with "TypeError: TeacherRequestError.__init__() missing 1 required positional argument"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is TeacherRequestError
    assert (again.code, again.message, again.where, str(again)) == (
        err.code, err.message, err.where, str(err)
    )  # fmt: skip


def test_a_limit_of_exactly_one_node_row_works(server_factory, teacher_env, direct) -> None:
    """The lower bound is inclusive: one node per message (5 slices of each 5-node window)."""
    server = server_factory()
    minimum = codec_slices.min_message_bytes(direct.meta.window_shape, "float32", 2)
    with SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, max_message_bytes=minimum
    ) as client:
        items = list(client.stream("val", range(420, 424), spread=True))
    got = direct.predict(range(420, 424))
    pred, log_var = got.prediction, got.spread
    assert np.array_equal(np.concatenate([lab.prediction for _, lab in items]), pred)
    assert np.array_equal(np.concatenate([lab.spread for _, lab in items]), log_var)
    assert (client.stats.windows, client.stats.slices) == (4, 4 * 5)


def test_whole_windows_still_travel_whole(server_factory, teacher_env) -> None:
    """At least one window fits: chunks of whole windows as before, no node slices."""
    server = server_factory()
    with SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, max_message_bytes=4096
    ) as client:
        items = list(client.stream("train", range(0, 50)))
    per_chunk = (4096 - 1024) // (12 * 5 * 2 * 4 + 10)
    assert [len(i) for i, _ in items] == [per_chunk] * (50 // per_chunk) + [50 % per_chunk]
    assert client.stats.slices == 0


def test_message_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="65536"):
        ServerConfig(max_message_bytes=65535)  # the server's own limit keeps its floor
    with pytest.raises(ConfigError, match="max_message_bytes"):
        ClientOptions(max_message_bytes=0)
    assert ClientOptions(max_message_bytes=2000).max_message_bytes == 2000
