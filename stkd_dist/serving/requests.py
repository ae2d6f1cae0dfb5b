"""Validation of ``LabelRequest`` messages: which windows, in which order, in what form.

:func:`resolve_request` checks a request against the teacher a server holds and returns a
:class:`LabelPlan`, or raises :class:`RequestError` with the gRPC status code the client gets:
another dataset fingerprint or teacher version, or a spread (or hidden states) the teacher does
not have: FAILED_PRECONDITION; windows outside the split or a cursor past the end: OUT_OF_RANGE;
malformed ranges, split or plan, unknown dtype, a message limit below one node's labels of one
window: INVALID_ARGUMENT. A limit below one whole window is fine: windows are then split along the node
axis (see :mod:`~stkd_dist.serving.codec_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from stkd_dist.errors import InputError
from stkd_dist.serving import codec, codec_slices
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.teacher import TeacherMeta

# most windows one request may name (protects the server's memory from a malformed request)
MAX_SEQUENCE = 50_000_000
# an epoch is re-dealt once per change of world size: a few times, not thousands
MAX_REGROUPS = 1000


class RequestError(Exception):
    """A request the server refuses, with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LabelPlan:
    """What a validated request asks for."""

    split: str
    sequence: np.ndarray  # [total] window indices, in order
    start: int  # resume cursor
    per_chunk: int  # windows per chunk (1 when windows are split into node slices)
    dtype: int  # wire dtype enum
    spread: bool
    nodes_per_slice: int = 0  # nodes per message of a split window; 0 = whole windows
    hidden: bool = False  # the teacher's hidden states [N, F] per window too


def resolve_request(
    request: pb.LabelRequest,
    meta: TeacherMeta,
    *,
    chunk_steps: int,
    max_message_bytes: int,
    max_chunk_windows: int | None = None,
) -> LabelPlan:
    """Validate ``request`` for teacher ``meta`` and resolve its window sequence.

    Args:
        chunk_steps: time-chunk length of the teacher's store (shard plans are cut by it).
        max_chunk_windows: most windows in one chunk (the server's batch size: a chunk is sent
            once its last window is computed, so a stream's first labels arrive after one
            teacher batch, not after as many windows as fit in a message; None = no cap).
        max_message_bytes: the server's message limit (a request may only lower it, down to
            one node's labels of one window: :func:`codec_slices.min_message_bytes`).

    Raises:
        RequestError: with the status code for the client.
    """
    if request.dataset_fingerprint != meta.fingerprint:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this server serves dataset {meta.fingerprint}, the request is for "
            f"{request.dataset_fingerprint or '(none)'}",
        )
    if request.teacher_version and request.teacher_version != meta.version:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this server serves teacher {meta.version}, the request wants "
            f"{request.teacher_version}",
        )
    if request.split not in meta.splits:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown split {request.split!r}; choose one of {', '.join(meta.splits)}",
        )
    windows = meta.splits[request.split]
    which = request.WhichOneof("selection")
    if which == "ranges":
        sequence = _ranges(request.ranges.ranges, windows, request.split)
    elif which == "plan":
        sequence = _plan_windows(request.plan, windows, request.split, chunk_steps)
    else:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, "the request names no windows (ranges or plan)"
        )
    total = len(sequence)
    if not 0 <= request.resume_cursor <= total:
        raise RequestError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"resume cursor {request.resume_cursor} is outside the sequence of {total} windows",
        )
    outputs = set(request.outputs) or {pb.PREDICTION}
    if pb.OUTPUT_UNSPECIFIED in outputs or not outputs <= {pb.PREDICTION, pb.SPREAD, pb.HIDDEN}:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown outputs {sorted(outputs)}")
    spread = pb.SPREAD in outputs
    if spread and not meta.has_spread:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"teacher {meta.version} has no spread output (built without spread=True)",
        )
    hidden = pb.HIDDEN in outputs
    if hidden and not meta.hidden_dim:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"teacher {meta.version}'s hidden representation is not known to this server",
        )
    try:
        dtype = codec.wire_dtype(request.wire_dtype)
        limit = max_message_bytes
        if request.max_message_bytes:
            limit = min(limit, request.max_message_bytes)
        layout = codec_slices.chunk_layout(
            meta.window_shape, dtype, 1 + spread, limit, meta.hidden_dim if hidden else 0
        )
    except InputError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{e.where}: {e.message}") from None
    return LabelPlan(
        request.split,
        sequence,
        int(request.resume_cursor),
        layout.windows if max_chunk_windows is None else min(layout.windows, max_chunk_windows),
        dtype,
        spread,
        nodes_per_slice=layout.nodes,
        hidden=hidden,
    )


def _ranges(ranges: list[pb.WindowRange], windows: range, split: str) -> np.ndarray:
    parts = []
    total = 0
    for i, r in enumerate(ranges):
        step = r.step or 1
        if step < 1 or r.start < 0 or r.stop <= r.start:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"range {i} (start={r.start}, stop={r.stop}, step={r.step}) is malformed: "
                "need 0 <= start < stop and step >= 1",
            )
        total += (r.stop - r.start + step - 1) // step
        if total > MAX_SEQUENCE:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request names more than {MAX_SEQUENCE} windows; split it",
            )
        parts.append(np.arange(r.start, r.stop, step, dtype=np.int64))
    if not parts:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no ranges")
    seq = np.concatenate(parts)
    off = seq - windows.start
    bad = (seq < windows.start) | (seq >= windows.stop) | (off % windows.step != 0)
    if bad.any():
        raise RequestError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"window {int(seq[bad][0])} is not a window of split {split!r} "
            f"({len(windows)} windows: {windows.start}..{windows.stop - 1} step {windows.step})",
        )
    return seq


def _plan_windows(
    spec: pb.ShardPlanSpec, windows: range, split: str, chunk_steps: int
) -> np.ndarray:
    from stkd_dist.data.regroup import resume_plan

    if spec.world_size < 1 or not 0 <= spec.rank < spec.world_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"plan rank {spec.rank} is outside 0..{spec.world_size - 1}",
        )
    if len(spec.regroups) > MAX_REGROUPS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the plan names {len(spec.regroups)} regroups, more than {MAX_REGROUPS}",
        )
    try:
        plan = resume_plan(
            windows,
            spec.chunk_steps or chunk_steps,
            spec.world_size,
            [(g.world_size, g.steps) for g in spec.regroups],
            epoch=spec.epoch,
            seed=spec.seed,
            batch_size=spec.batch_size or 1,
            shuffle=spec.shuffle,
            split=split,
        )
    except InputError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{e.where}: {e.message}") from None
    # the plan holds blocks only: derive the one rank's sequence, not every rank's
    return plan.rank(spec.rank).window_array()
