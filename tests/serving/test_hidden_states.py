"""The teacher's hidden states as an output of the service: the forward pass, ``Describe``,
``LabelRequest.outputs = [PREDICTION, HIDDEN]`` (whole windows and node slices), and requests
without ``HIDDEN`` served exactly as before."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch

from stkd_dist.serving import codec
from stkd_dist.serving.client import SoftLabelClient
from stkd_dist.serving.client_options import STREAM_LABELS
from stkd_dist.serving.forward import forward_micro_batches, prepare_inputs
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.server import TeacherServer
from stkd_dist.serving.teacher import Teacher

pytestmark = pytest.mark.integration

WINDOWS = range(0, 32)  # one whole micro-batch of the teacher (32 windows a model call)


def features_of(teacher: Teacher, windows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """``Forecaster(..., output="features")`` on ``windows``, computed here without the serving
    code: one call on the same inputs the teacher reads (a batch of one micro-batch's size)."""
    batch = teacher.reader.batch(np.asarray(windows))
    with torch.no_grad():
        mean, hidden = teacher.model(
            batch.x, batch.time_of_day, batch.day_of_week, output="features"
        )
    return mean, hidden  # [n, H, N, C], [n, N, F] float32


def request(env, windows: range, outputs: list[int], **fields: object) -> pb.LabelRequest:
    return pb.LabelRequest(
        dataset_fingerprint=env.fingerprint,
        split="train",
        ranges=pb.WindowRanges(
            ranges=[pb.WindowRange(start=windows.start, stop=windows.stop, step=1)]
        ),
        outputs=outputs,
        **fields,
    )


def raw_chunks(server: TeacherServer, req: pb.LabelRequest) -> list[bytes]:
    """The serialized chunks exactly as the server sends them."""
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_stream(
            STREAM_LABELS,
            request_serializer=pb.LabelRequest.SerializeToString,
            response_deserializer=None,
        )
        return list(call(req, timeout=30))


def test_the_forward_pass_returns_hidden_states_and_the_same_predictions(direct) -> None:
    batch = prepare_inputs(direct.reader, np.asarray(WINDOWS), direct.compute)
    plain = forward_micro_batches(direct.model, batch, direct.compute)
    full = forward_micro_batches(direct.model, batch, direct.compute, hidden=True)
    assert plain.hidden is None and full.hidden is not None
    # the network call is the same: predictions and spread bitwise those of a pass without
    assert np.array_equal(full.prediction, plain.prediction)
    assert full.spread is not None and np.array_equal(full.spread, plain.spread)
    mean, hidden = features_of(direct, WINDOWS)
    assert full.hidden.dtype == np.float32 and full.hidden.shape == (32, 5, 8)  # LSTM hidden=8
    assert torch.equal(torch.from_numpy(full.hidden), hidden)
    assert torch.equal(torch.from_numpy(full.prediction), mean)
    # padding to whole micro-batches never leaks into the hidden states
    five = direct.predict(np.arange(5), hidden=True)
    assert five.hidden is not None and np.array_equal(five.hidden, full.hidden[:5])


def test_describe_reports_the_hidden_width(
    server_factory: Callable[..., TeacherServer], direct: Teacher
) -> None:
    server = server_factory()
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.TeacherServiceStub(channel).Describe(pb.DescribeRequest(), timeout=10)
    assert info.hidden_dim == direct.model.hidden_dim() == direct.meta.hidden_dim == 8


def test_a_request_for_hidden_states_gets_the_teachers_features(
    server_factory: Callable[..., TeacherServer], teacher_env, direct: Teacher
) -> None:
    server = server_factory()
    chunks = raw_chunks(server, request(teacher_env, WINDOWS, [pb.PREDICTION, pb.HIDDEN]))
    decoded = [codec.decode_chunk_bytes(c) for c in chunks]
    assert np.concatenate([d.indices for d in decoded]).tolist() == list(WINDOWS)
    assert all(d.spread is None for d in decoded)  # only the outputs asked for
    got = np.concatenate([d.hidden for d in decoded if d.hidden is not None])
    pred = np.concatenate([d.prediction for d in decoded])
    mean, hidden = features_of(direct, WINDOWS)
    assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), hidden)
    assert torch.equal(torch.from_numpy(pred), mean)
    # the client hands them on as the labels' hidden field
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        items = list(c.stream("train", WINDOWS, spread=True, hidden=True))
    streamed = np.concatenate([lab.hidden for _, lab in items if lab.hidden is not None])
    assert np.array_equal(streamed, got)
    assert all(lab.spread is not None for _, lab in items)


def test_requests_without_hidden_states_get_the_messages_they_always_got(
    server_factory: Callable[..., TeacherServer], teacher_env
) -> None:
    plain = request(teacher_env, WINDOWS, [pb.PREDICTION, pb.SPREAD], max_message_bytes=4096)
    before = raw_chunks(server_factory(), plain)
    # a server whose batches computed hidden states for another request first (the recent
    # LRU then serves this request from them): the very same bytes, and no hidden field
    server = server_factory()
    raw_chunks(server, request(teacher_env, WINDOWS, [pb.PREDICTION, pb.HIDDEN]))
    after = raw_chunks(server, plain)
    assert server.batcher_stats().recent_hits == len(WINDOWS)
    assert after == before and len(before) > 1
    assert all(not pb.LabelChunk.FromString(c).HasField("hidden") for c in after)


def test_hidden_states_of_windows_larger_than_a_message_arrive_in_node_slices(
    server_factory: Callable[..., TeacherServer], teacher_env, direct: Teacher
) -> None:
    server = server_factory()
    per_window = 12 * 5 * 2 * 4 + 5 * 8 * 4  # prediction [12, 5, 2] and hidden [5, 8], float32
    limit = 1024 + 10 + 33 + per_window // 2  # half a window: slices of 2 of the 5 nodes
    with SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, max_message_bytes=limit
    ) as client:
        items = list(client.stream("train", range(3, 9), hidden=True))
    assert client.stats.slices == 6 * 3 and client.stats.windows == 6
    got = np.concatenate([lab.hidden for _, lab in items if lab.hidden is not None])
    ref = direct.predict(np.arange(3, 9), hidden=True)
    assert ref.hidden is not None and np.array_equal(got, ref.hidden)
    assert np.array_equal(np.concatenate([lab.prediction for _, lab in items]), ref.prediction)


def test_hidden_states_in_half_precision_on_the_wire(
    server_factory: Callable[..., TeacherServer], teacher_env, direct: Teacher
) -> None:
    server = server_factory()
    with SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, wire_dtype="bfloat16"
    ) as client:
        items = list(client.stream("train", WINDOWS, hidden=True))
    got = np.concatenate([lab.hidden for _, lab in items if lab.hidden is not None])
    ref = direct.predict(np.asarray(WINDOWS), hidden=True).hidden
    assert ref is not None
    rounded = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
    assert np.array_equal(got, rounded)


def test_a_server_that_does_not_know_the_hidden_width_refuses_them(
    server_factory: Callable[..., TeacherServer], teacher_env
) -> None:
    server = server_factory()
    server.teacher.meta = dataclasses.replace(server.teacher.meta, hidden_dim=0)
    with pytest.raises(grpc.RpcError) as info:
        raw_chunks(server, request(teacher_env, range(0, 4), [pb.PREDICTION, pb.HIDDEN]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hidden" in (info.value.details() or "")
