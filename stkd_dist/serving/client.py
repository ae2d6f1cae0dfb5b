"""The soft-label client student workers use: resume, failover and prefetch.

:meth:`SoftLabelClient.stream` returns a :class:`LabelStream`: an iterator of
``(indices [n], labels)`` over the requested windows, in order (``labels`` a
:class:`~stkd_dist.serving.label_arrays.LabelArrays`: prediction ``[n, H, N, C]``, the spread
and the hidden states ``[n, N, F]`` when asked for). A
background thread reads the gRPC stream into a bounded queue of ``prefetch`` chunks, so the
consumer does not wait while the teacher keeps up and memory stays bounded when it does not.

Exactly once: every chunk names the cursor to resume after it. When a stream breaks (UNAVAILABLE,
DEADLINE_EXCEEDED, a replica killed or draining, a checksum mismatch) the client reconnects, to the
next replica when there is one, with exponential backoff, and asks for the same sequence from the
last cursor it fully received. Chunks are handed to the consumer only after their checksum
verified, so every window is delivered exactly once. Windows larger than the message limit arrive
as node slices and are handed on whole, once their last slice has arrived
(:class:`~stkd_dist.serving.codec_slices.WindowAssembler`: one partial window at a time, dropped
when the stream breaks, since the cursor only moves past a window with its last slice).

Placement (:class:`~stkd_dist.serving.placement.Placement`): every new stream goes to the known
replica with the fewest outstanding windows; the endpoints are resolved again every
``discovery_s`` seconds, so replicas started meanwhile are used without any failure. A full
replica's RESOURCE_EXHAUSTED places the stream elsewhere (not a failure); with every replica full
a stream waits for a slot.

Streams are :class:`~stkd_dist.serving.label_stream.LabelStream` objects (prefetch thread and
``labels_for``), re-exported here.

Consistency: every request names the dataset fingerprint, and after the first chunk the teacher
version too (or the expected version from the start), so a replica serving another dataset or
teacher refuses (FAILED_PRECONDITION): that is a :class:`LabelMismatchError`, never retried.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from stkd_dist.errors import ConfigError, InputError, StkdError
from stkd_dist.serving import codec, codec_slices
from stkd_dist.serving.channels import Channels
from stkd_dist.serving.client_options import (
    MAX_RANGES_PER_REQUEST,
    OPTION_NAMES,
    RETRYABLE,
    STREAM_LABELS,
    Backoff,
    ClientOptions,
    ClientStats,
    LabelMismatchError,
    PlanRequest,
    TeacherRequestError,
    TeacherUnavailableError,
    to_ranges,
)
from stkd_dist.serving.discovery import Endpoint, EndpointSource
from stkd_dist.serving.label_stream import LabelItem, LabelStream
from stkd_dist.serving.placement import Placement
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# the client's settings, requests and errors are importable from here, with the client
__all__ = [
    "MAX_RANGES_PER_REQUEST",
    "OPTION_NAMES",
    "RETRYABLE",
    "STREAM_LABELS",
    "Backoff",
    "ClientOptions",
    "ClientStats",
    "LabelItem",
    "LabelMismatchError",
    "LabelStream",
    "PlanRequest",
    "SoftLabelClient",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "to_ranges",
]


class SoftLabelClient:
    """Client of one or more teacher replicas.

    Args:
        endpoints: ``host:port`` (list or comma-separated), ``dns:///name:port`` or
            ``ray:PREFIX`` (see :mod:`~stkd_dist.serving.discovery`).
        expected_fingerprint: the fingerprint of the dataset the labels must be for.
        expected_version: the teacher version required (None = whichever the first replica
            serves; every later chunk, from any replica, must then be of that version).
        options: connection settings (token, TLS, wire dtype, prefetch, limits, backoff).
        **overrides: fields of :class:`ClientOptions` to set on top of ``options``.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        expected_fingerprint: str,
        expected_version: str | None = None,
        options: ClientOptions | None = None,
        **overrides: Any,
    ) -> None:
        if not expected_fingerprint:
            raise ConfigError(
                "the expected dataset fingerprint is required", "expected_fingerprint"
            )
        try:
            opts = dataclasses.replace(options or ClientOptions(), **overrides)
        except TypeError as e:
            raise ConfigError(f"{e}; options are {', '.join(OPTION_NAMES)}", "client") from None
        self.options = opts
        self.source = EndpointSource(endpoints)
        self.expected_fingerprint = expected_fingerprint
        self.version = expected_version
        self.wire_dtype = codec.wire_dtype(opts.wire_dtype)
        self.prefetch = int(opts.prefetch)
        self.max_message_bytes = int(opts.max_message_bytes)
        self.deadline = opts.deadline
        self.backoff = opts.backoff
        self.stats = ClientStats()
        self._lock = threading.Lock()
        self.channels = Channels(opts)
        self._metadata = self.channels.metadata
        self.placement = Placement(self.source, self.channels.probe, opts.discovery_s)
        self._streams: list[LabelStream] = []

    # -- placement -----------------------------------------------------------------------------
    def _pick(
        self,
        exclude: Sequence[Endpoint],
        refresh: bool,
        cursor: int = 0,
        hint: int | None = None,
    ) -> Endpoint:
        """The replica for the next call (:meth:`Placement.place`: waits while all are full);
        an empty source is resolved again with backoff before it is an error."""
        for attempt in range(1, self.backoff.max_attempts + 1):
            try:
                return self.placement.place(
                    exclude,
                    refresh or attempt > 1,
                    hint,
                    backoff=self.backoff,
                    timeout_s=self.options.admission_timeout_s,
                    on_wait=self._count_wait,
                )
            except LookupError:
                time.sleep(self.backoff.delay(attempt))
        raise TeacherUnavailableError(
            self._gone_message("no teacher replica is running", cursor, None),
            where=str(self.source.spec),
        )

    def _count_wait(self) -> None:
        with self._lock:
            self.stats.admission_waits += 1

    def _gone_message(self, what: str, cursor: int, total: int | None) -> str:
        tried = ", ".join(self.placement.tried) or "none"
        return (
            f"teacher {self.version or '(version not yet known)'} at {self.source.spec}: {what}; "
            f"endpoints tried: {tried}; stopped at window {cursor} of "
            f"{total if total is not None else '?'}. Re-running resumes from the last checkpoint"
        )

    def describe(self) -> pb.TeacherInfo:
        """``Describe`` of a replica, checked against the expected fingerprint and version."""
        attempt = 0
        exclude: tuple[Endpoint, ...] = ()
        while True:
            ep = self._pick(exclude, refresh=attempt > 0)
            stub = pb_grpc.TeacherServiceStub(self.channels.get(ep))
            try:
                info = stub.Describe(
                    pb.DescribeRequest(), timeout=self.deadline, metadata=self._metadata
                )
            except grpc.RpcError as e:
                code = e.code()
                attempt += 1
                if code not in RETRYABLE or attempt >= self.backoff.max_attempts:
                    raise _request_error(code, e.details(), ep) from None
                exclude = (ep,)
                time.sleep(self.backoff.delay(attempt))
                continue
            self._check(info.dataset_fingerprint, info.teacher_version, ep)
            return info

    def _check(self, fingerprint: str, version: str, ep: Endpoint) -> None:
        if fingerprint and fingerprint != self.expected_fingerprint:
            raise LabelMismatchError(
                f"the teacher at {ep.address} serves dataset {fingerprint}, expected "
                f"{self.expected_fingerprint}",
                where=ep.address,
            )
        with self._lock:
            if self.version is None:
                self.version = version  # pin: failover must not switch teachers
            elif version != self.version:
                raise LabelMismatchError(
                    f"the teacher at {ep.address} serves version {version}, expected {self.version}",
                    where=ep.address,
                )

    # -- streams -------------------------------------------------------------------------------
    def stream(
        self,
        split: str,
        windows: Sequence[int] | np.ndarray,
        *,
        spread: bool = False,
        hidden: bool = False,
    ) -> LabelStream:
        """Labels of ``windows`` of ``split``, in this order (see :class:`LabelStream`); with
        ``spread`` / ``hidden`` also the teacher's spread / hidden states."""
        ranges = to_ranges(windows)
        if not ranges:
            raise InputError("no windows requested", where="windows")
        requests = []
        for lo in range(0, len(ranges), MAX_RANGES_PER_REQUEST):
            part = ranges[lo : lo + MAX_RANGES_PER_REQUEST]
            sel = pb.WindowRanges(
                ranges=[pb.WindowRange(start=a, stop=b, step=s) for a, b, s in part]
            )
            requests.append(self._request(split, spread, hidden, ranges=sel))
        return self._open(requests, total=len(np.asarray(windows).reshape(-1)))

    def stream_plan(
        self, split: str, plan: PlanRequest, *, spread: bool = False, hidden: bool = False
    ) -> LabelStream:
        """Labels of the windows rank ``plan.rank`` reads in ``plan.epoch``, in that order.

        The server recomputes the plan; padding entries are not streamed (see
        :meth:`LabelStream.labels_for`).
        """
        spec = pb.ShardPlanSpec(
            world_size=plan.world_size,
            rank=plan.rank,
            epoch=plan.epoch,
            seed=plan.seed,
            batch_size=plan.batch_size,
            shuffle=plan.shuffle,
            chunk_steps=plan.chunk_steps,
            regroups=[pb.PlanRegroup(world_size=w, steps=s) for w, s in plan.regroups],
        )
        request = self._request(split, spread, hidden, plan=spec)
        # a resumed epoch starts where its last checkpoint was: the cursor of a stream resumed
        # after a failure, the server skips what comes before it
        request.resume_cursor = plan.start
        return self._open([request], total=None)

    def _request(self, split: str, spread: bool, hidden: bool, **selection: Any) -> pb.LabelRequest:
        # exactly the outputs wanted: a request without SPREAD or HIDDEN is the one it always was
        outputs = [
            pb.PREDICTION,
            *([pb.SPREAD] if spread else []),
            *([pb.HIDDEN] if hidden else []),
        ]
        return pb.LabelRequest(
            dataset_fingerprint=self.expected_fingerprint,
            split=split,
            wire_dtype=self.wire_dtype,
            outputs=outputs,
            max_message_bytes=self.max_message_bytes,
            **selection,
        )

    def _open(self, requests: list[pb.LabelRequest], total: int | None) -> LabelStream:
        stream = LabelStream(self._fetch, requests, total, self.prefetch)
        with self._lock:
            self._streams = [s for s in self._streams if not s.closed]
            self._streams.append(stream)
        return stream

    def close(self) -> None:
        """Stop every open stream and close the channels."""
        with self._lock:
            streams, self._streams = self._streams, []
        for s in streams:
            s.close()
        self.channels.close()

    def __enter__(self) -> SoftLabelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request, resumed until complete ---------------------------------------------------
    def _fetch(
        self, request: pb.LabelRequest, stream: LabelStream
    ) -> Iterator[LabelItem]:  # runs in the stream's producer thread
        cursor = request.resume_cursor  # 0, or where a resumed epoch starts
        total: int | None = None
        failures = 0
        refresh = False
        exclude: tuple[Endpoint, ...] = ()
        # a rank's plan stream: equally loaded replicas are taken in rank order
        hint = request.plan.rank if request.WhichOneof("selection") == "plan" else None
        while total is None or cursor < total:
            if stream.closed:
                return
            ep = self._pick(exclude, refresh, cursor, hint)
            hint = None  # failover: round robin among the others
            refresh, exclude = False, ()
            req = pb.LabelRequest()
            req.CopyFrom(request)
            req.resume_cursor = cursor
            req.teacher_version = self.version or ""
            # chunks arrive as bytes: decode_chunk_bytes copies the labels once, where protobuf
            # parsing would copy them twice
            stream_labels = self.channels.get(ep).unary_stream(
                STREAM_LABELS,
                request_serializer=pb.LabelRequest.SerializeToString,
                response_deserializer=None,
            )
            call = stream_labels(req, timeout=self.deadline, metadata=self._metadata)
            stream.call = call
            # node slices of one window at a time; a new call starts from the window's first
            # slice (the cursor stays at a window until its last slice), so this one's go with it
            assembler = codec_slices.WindowAssembler()
            try:
                for data in call:
                    part = codec.decode_chunk_bytes(data)  # raises ChecksumError
                    self._check("", part.teacher_version, ep)
                    total = part.total
                    if part.nodes is not None:
                        with self._lock:
                            self.stats.slices += 1
                    # checks that the chunk continues at `cursor`; raises ChecksumError
                    chunk = assembler.add(part, cursor)
                    if chunk is None:
                        continue  # a partial window: not handed on, the cursor stays
                    cursor, failures = chunk.cursor, 0
                    with self._lock:
                        self.stats.chunks += 1
                        self.stats.windows += len(chunk.indices)
                        self.stats.bytes += chunk.payload_bytes
                        self.stats.endpoints.add(ep.address)
                    yield chunk.indices, chunk.labels
                    if stream.closed:
                        call.cancel()
                        return
                if total is None:  # an empty sequence: the server had nothing to send
                    return
                if cursor < total:
                    raise codec.ChecksumError(f"stream ended at cursor {cursor} of {total}")
            except grpc.RpcError as e:
                if stream.closed:
                    return
                code = e.code()
                details = e.details()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise LabelMismatchError(details, where=ep.address) from None
                if code not in RETRYABLE:
                    raise _request_error(code, details, ep) from None
                exclude = (ep,)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # full: another replica (or a wait for a slot in _pick), not a failure
                    with self._lock:
                        self.stats.redirects += 1
                    log.info("%s is full; placing the stream elsewhere", ep.address)
                    # a moment's pause: a probe that raced the refusal must not spin the loop
                    time.sleep(self.backoff.delay(1))
                    continue
                failures += 1
                log.info("stream from %s broke (%s: %s); resuming at %d", ep.address,
                         code.name, details, cursor)  # fmt: skip
            except codec.ChecksumError as e:
                call.cancel()
                failures += 1
                exclude = (ep,)
                with self._lock:
                    self.stats.checksum_failures += 1
                log.warning("bad chunk from %s (%s); resuming at %d", ep.address, e, cursor)
            else:
                continue
            if failures >= self.backoff.max_attempts:
                raise TeacherUnavailableError(
                    self._gone_message(
                        f"no replica delivered the labels after {failures} attempts", cursor, total
                    ),
                    where=str(self.source.spec),
                )
            with self._lock:
                self.stats.reconnects += 1
            # every known replica failed once since the last progress: look for moved ones
            refresh = failures % max(len(self.placement.endpoints), 1) == 0
            time.sleep(self.backoff.delay(failures))


def _request_error(code: grpc.StatusCode, details: str, ep: Endpoint) -> StkdError:
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LabelMismatchError(details, where=ep.address)
    if code in RETRYABLE:
        return TeacherUnavailableError(f"{code.name}: {details}", where=ep.address)
    return TeacherRequestError(code, details, where=ep.address)
