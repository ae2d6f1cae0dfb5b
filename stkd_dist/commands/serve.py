"""``stkd serve``: serve a teacher's soft labels over gRPC."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import torch

from stkd_dist.commands import SUMMARIES
from stkd_dist.errors import ConfigError
from stkd_dist.location import Location, exists, location, url
from stkd_dist.paths import run_dir
from stkd_dist.serving import codec
from stkd_dist.serving.auth import ServerTls, resolve_token
from stkd_dist.serving.cache import (
    SERVE_MEMORY_BYTES,
    LabelCache,
    default_cache_path,
    open_cache,
)
from stkd_dist.serving.forward import (
    CLI_KEYS,
    DEFAULT_MICRO_BATCH,
    PRECISIONS,
    ComputeSettings,
    resolve_compute,
)
from stkd_dist.serving.published import Follower, Published, read_published
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import Teacher, load_teacher

log = logging.getLogger("stkd.serve")

EPILOG = """\
examples:
  # local, no security: binds 127.0.0.1 only
  stkd serve --checkpoint my-run --data demo --port 50051

  # on a GPU in bf16 (labels then differ in their last bits from a CPU server's)
  stkd serve --checkpoint my-run --data demo --device cuda --precision bf16 --batch-size 256

  # serve from the label cache made by `stkd precompute-labels`, filling it where it has gaps
  stkd serve --checkpoint my-run --data demo --cache auto --write-through

  # reachable from other machines: TLS, client certificates and a token, Prometheus metrics
  STKD_TOKEN=s3cret stkd serve --checkpoint my-run --data demo --host 0.0.0.0 --port 50051 \\
      --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem --metrics-port 9100

  # keep serving what `stkd update my-run` publishes after `stkd ingest --append` grew the store
  stkd serve --follow my-run --data demo --port 50051

Without TLS and without a token the server binds 127.0.0.1 whatever --host says. SIGTERM drains:
health turns NOT_SERVING, new streams are refused, in-flight ones get --drain-grace seconds,
then end at a chunk boundary and their clients resume on another replica.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` parser."""
    p = subparsers.add_parser(
        "serve",
        help=SUMMARIES["serve"],
        description=(
            "Load a teacher from its checkpoint and stream its outputs (soft labels) on the "
            "windows of its dataset to students over gRPC. Concurrent streams share one batching "
            "queue; labels found in the label cache are served without running the teacher."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        help="teacher checkpoint, run dir or run name (with --follow: default the run's "
        "published version, else its teacher)",
    )
    p.add_argument("--data", required=True, help="the teacher's dataset (store path or name)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=50051, help="port (0 = a free one; default 50051)")
    net.add_argument("--max-streams", type=int, default=16, help="concurrent streams (default 16)")
    net.add_argument(
        "--max-message-bytes",
        type=int,
        default=codec.DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest label message sent (default {codec.DEFAULT_MAX_MESSAGE_BYTES}, at least "
        "65536; clients may ask for less). Chunks carry as many whole windows as fit; a window "
        "whose labels alone are larger is split along the node axis into several messages, "
        "which the client reassembles",
    )
    net.add_argument(
        "--drain-grace", type=float, default=10.0, help="seconds streams run on after SIGTERM"
    )
    net.add_argument("--ready-file", type=Path, help="write {address, port, pid} here when up")
    inf = p.add_argument_group("inference")
    inf.add_argument("--batch-size", type=int, default=64, help="windows per forward (default 64)")
    inf.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill"
    )
    inf.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    inf.add_argument(
        "--device",
        default="cpu",
        help="where the teacher runs: auto (CUDA when available, else the CPU), cpu, cuda or "
        "cuda:<i> (default cpu: labels bitwise equal to a CPU label cache)",
    )
    inf.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), or bf16/fp16 under CUDA autocast (CUDA only; the CPU computes in "
        "fp32)",
    )
    inf.add_argument(
        "--micro-batch",
        type=int,
        default=DEFAULT_MICRO_BATCH,
        help="windows per model call, the last one padded (default %(default)s): it fixes the "
        "labels' bits however requests are batched, so keep it per teacher version (label "
        "caches record it)",
    )
    cache = p.add_argument_group("label cache")
    cache.add_argument(
        "--cache",
        help="label cache to serve from: a path, or 'auto' = <storage>/labels/<fingerprint>/"
        "<teacher version>.zarr",
    )
    cache.add_argument(
        "--write-through", action="store_true", help="store every computed label in the cache"
    )
    cache.add_argument(
        "--cache-hidden",
        action="store_true",
        help="a cache created by --write-through also stores the teacher's hidden states "
        "(for students trained with distill.loss: hint)",
    )
    cache.add_argument(
        "--cache-memory-mb",
        type=int,
        default=SERVE_MEMORY_BYTES // 2**20,
        help="hold cached splits up to this size in memory (default %(default)s MiB; 0 = read "
        "every chunk from Zarr)",
    )
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    sec.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sec.add_argument("--tls-client-ca", type=Path, help="require client certificates from this CA")
    sec.add_argument("--token", help="bearer token clients must send (default $STKD_TOKEN)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    ops.add_argument(
        "--follow",
        metavar="RUN",
        help="serve the versions `stkd update RUN` publishes (run name or run directory): each "
        "new version is loaded on the store as it is then; new streams get it, streams in "
        "progress finish on theirs",
    )
    ops.add_argument(
        "--follow-interval",
        type=float,
        default=10.0,
        help="seconds between checks of the run's published version (default %(default)s)",
    )
    p.set_defaults(func=run)


def _tls(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ConfigError("needs --tls-cert and --tls-key", where="--tls-client-ca")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("give both --tls-cert and --tls-key", where="--tls-cert")
    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)


def _check_cache_args(args: argparse.Namespace) -> None:
    if args.cache_memory_mb < 0:
        raise ConfigError(f"must be >= 0, got {args.cache_memory_mb}", where="--cache-memory-mb")
    if args.write_through and args.cache is None:
        raise ConfigError("needs --cache PATH or --cache auto", where="--write-through")
    if args.cache_hidden and not args.write_through:
        raise ConfigError("applies to a cache --write-through creates", where="--cache-hidden")


def _cache(args: argparse.Namespace, teacher: Teacher) -> LabelCache | None:
    if args.cache is None:
        return None
    meta = teacher.meta
    if args.cache == "auto":
        path = default_cache_path(meta.fingerprint, meta.version)
        if not exists(path) and not args.write_through:
            log.info("no label cache at %s: every label comes from the teacher", url(path))
            return None
    else:
        path = location(args.cache)
    return open_cache(
        path,
        meta,
        writable=args.write_through,
        memory_bytes=args.cache_memory_mb * 2**20,
        # a cache created here records how this teacher computes its labels
        compute=teacher.compute,
        # a cache created here is chunked like the shard plan's blocks of this store
        chunk_steps=teacher.reader.store.chunks[0],
        hidden=args.cache_hidden,
    )


def _write_ready(path: Path, server: TeacherServer) -> None:
    data = {
        "address": server.address,
        "host": server.host,
        "port": server.port,
        "pid": os.getpid(),
        "metrics_port": server.metrics_port,
        "teacher_version": server.teacher.version,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _first_checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint served first: ``--checkpoint``, else the followed run's published
    version, else that run's teacher."""
    if args.checkpoint:
        return str(args.checkpoint)
    if not args.follow:
        raise ConfigError("name the teacher: --checkpoint (or --follow RUN)", where="--checkpoint")
    published = read_published(_followed_run(args))
    return published.checkpoint if published is not None else str(args.follow)


def _followed_run(args: argparse.Namespace) -> Location:
    ref = location(args.follow)
    return ref if exists(ref) else run_dir(str(args.follow))


def _follow(args: argparse.Namespace, server: TeacherServer, compute: ComputeSettings) -> Follower:
    """Publish the run's new versions to ``server`` as they appear."""

    def load(published: Published) -> Teacher:
        return load_teacher(
            published.checkpoint,
            args.data,
            device=compute.device,
            precision=compute.precision,
            micro_batch=compute.micro_batch,
            keys=CLI_KEYS,
        )

    def on_new(teacher: Teacher) -> None:
        # --cache auto names one cache per version; a fixed --cache path is the first one's
        cache = _cache(args, teacher) if args.cache == "auto" else None
        server.publish(teacher, cache, args.write_through and cache is not None)
        print(
            f"stkd serve: now serving teacher {teacher.version} to new streams",
            file=sys.stderr,
            flush=True,
        )

    run = _followed_run(args)
    return Follower(run, load, on_new, server.teacher.version, args.follow_interval).start()


def run(args: argparse.Namespace) -> int:
    """Run ``stkd serve`` until SIGTERM/SIGINT has drained it."""
    _check_cache_args(args)  # before the (slow) teacher load
    if args.follow_interval <= 0:
        raise ConfigError("must be > 0 seconds", where="--follow-interval")
    checkpoint = _first_checkpoint(args)
    # checked against this machine before the load too: a missing GPU fails in a second
    compute = resolve_compute(args.device, args.precision, args.micro_batch, CLI_KEYS)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_streams=args.max_streams,
        batch_size=args.batch_size,
        batch_wait_s=args.batch_wait_ms / 1000.0,
        max_message_bytes=args.max_message_bytes,
        token=resolve_token(args.token),
        tls=_tls(args),
        drain_grace_s=args.drain_grace,
        metrics_port=args.metrics_port,
    )
    print(f"stkd serve: loading teacher {checkpoint}", file=sys.stderr, flush=True)
    teacher = load_teacher(
        checkpoint,
        args.data,
        device=compute.device,
        precision=compute.precision,
        micro_batch=compute.micro_batch,
        keys=CLI_KEYS,
    )
    server = TeacherServer(teacher, config, _cache(args, teacher), args.write_through)
    server.start()
    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            # drain in a thread: it waits for streams, which need this (main) thread free
            threading.Thread(target=server.drain, name="stkd-drain", daemon=True).start()
        else:
            threading.Thread(target=server.stop, name="stkd-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    follower = _follow(args, server, compute) if args.follow else None
    if args.ready_file is not None:
        _write_ready(args.ready_file, server)
    print(
        f"stkd serve: teacher {teacher.version} ({teacher.meta.model_key}) on {server.address}"
        + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""),
        file=sys.stderr,
        flush=True,
    )
    while not server.wait(timeout=0.5):
        pass
    if follower is not None:
        follower.stop()
    print(
        f"stkd serve: stopped after {teacher.forward_windows} teacher forward windows",
        file=sys.stderr,
        flush=True,
    )
    return 0
