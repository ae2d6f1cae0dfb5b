"""``stkd train-student``: distil a student from teacher soft labels on Ray Train."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands._common import add_config_args, config_from_args, warn_untrained_weekdays
from stkd_dist.serving.client import ClientOptions

CLIENT_DEFAULTS = ClientOptions()

EPILOG = """\
examples:
  # two replicas of one teacher (stkd serve), the student run next to the teacher's
  stkd train-student --config demo --teacher 127.0.0.1:50051,127.0.0.1:50052

  # an ensemble of two teachers (one --teacher per teacher, each with its replicas)
  stkd train-student --config demo --teacher 10.0.0.5:50051,10.0.0.6:50051 \\
      --teacher 10.0.0.7:50051 --set distill.ensemble=inverse_error --token "$STKD_TOKEN"

  # start 2 replicas of the run's own teacher as Ray actors, or of another checkpoint
  stkd train-student --config demo --teacher ray:2
  stkd train-student --config demo --teacher ray:2 --checkpoint runs/other/teacher/epoch_0009

  # labels precomputed with `stkd precompute-labels`: no server needed
  stkd train-student --config demo --labels cache:storage/labels/<fingerprint>/<version>.zarr

  # the baseline every report compares against: the same student on the targets only
  stkd train-student --config demo --no-distill

Each worker reads its shard of every epoch and streams the soft labels of exactly those windows
from the teacher(s), in the order it trains on them. The run lives in <storage>/runs/<run-name>/:
student_kd/ (student_scratch/ with --no-distill) holds epoch_NNNN checkpoints, history.jsonl,
best.json, teachers.json and labels/epoch_NNNN/rank_R.json (labels delivered per rank).
Running the same run name again resumes it; a finished run is not trained again.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-student`` parser."""
    parser = subparsers.add_parser(
        "train-student",
        help=SUMMARIES["train-student"],
        description=(
            "Train the student model of a config with DDP on Ray Train, distilling it from one "
            "or more teachers: every worker streams its own shard's soft labels from the teacher "
            "service (replicas fail over without losing or repeating a window) or reads them "
            "from a label cache, and applies the distillation loss of the config's `distill` "
            "section. Checkpoints, best-N, resume and fault tolerance work as for the teacher."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    src = parser.add_argument_group("teachers")
    src.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="HOST:PORT[,HOST:PORT...]",
        help="one teacher: its replicas' endpoints (also dns:///NAME:PORT, ray:PREFIX), or "
        "ray:N to start N replicas as Ray actors; repeat for an ensemble (distill.ensemble). "
        "ray:N replicas write through to the run's label cache (<run>/labels/), so the teacher "
        "computes each window once however many epochs read it (serve.write_through=false: "
        "compute on every request)",
    )
    src.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="cache:PATH",
        help="one teacher's precomputed label cache (stkd precompute-labels); repeatable",
    )
    src.add_argument(
        "--no-distill",
        action="store_true",
        help="train the student on the targets only (the baseline; no teacher)",
    )
    src.add_argument(
        "--checkpoint",
        metavar="CKPT|RUN",
        help="teacher checkpoint that ray:N replicas serve (default: the run's own teacher)",
    )
    src.add_argument(
        "--replica-cpus",
        type=float,
        default=0.0,
        metavar="N",
        help="CPUs Ray reserves per ray:N replica (default 0: they share the workers' cores)",
    )
    net = parser.add_argument_group("teacher service client")
    net.add_argument("--token", help="bearer token of the teacher service (default $STKD_TOKEN)")
    net.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the servers (TLS)")
    net.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    net.add_argument("--tls-key", metavar="PEM", help="client key (mutual TLS)")
    net.add_argument(
        "--wire-dtype",
        default=CLIENT_DEFAULTS.wire_dtype,
        choices=("float32", "float16", "bfloat16"),
        help="label precision on the wire (default float32: bit-exact, reproducible)",
    )
    net.add_argument(
        "--label-prefetch",
        type=int,
        default=CLIENT_DEFAULTS.prefetch,
        metavar="N",
        help=f"label chunks buffered ahead of training per teacher (default "
        f"{CLIENT_DEFAULTS.prefetch})",
    )
    net.add_argument(
        "--label-chunk-bytes",
        type=int,
        default=CLIENT_DEFAULTS.max_message_bytes,
        metavar="BYTES",
        help=f"largest label message (default {CLIENT_DEFAULTS.max_message_bytes}; the "
        "server caps it to its --max-message-bytes). A window whose labels are larger arrives "
        "split along the node axis and is reassembled; the least is one node's labels of one "
        "window plus ~1 KB of headers",
    )
    parser.set_defaults(func=run)


def _absolute(path: str | None) -> str | None:
    # workers read the PEM files themselves, from another working directory
    return None if path is None else str(Path(path).expanduser().absolute())


def run(args: argparse.Namespace) -> int:
    """Run ``stkd train-student``."""
    from stkd_dist.labels.started import replica_plan
    from stkd_dist.labels.teachers import parse_labels, parse_teacher
    from stkd_dist.serving.auth import resolve_token
    from stkd_dist.train.student import StudentRequest, train_student

    cfg = config_from_args(args, roles=("student",))
    warn_untrained_weekdays(cfg, args.storage, "student")
    teachers = (
        *(parse_teacher(t) for t in args.teacher),
        *(parse_labels(t) for t in args.labels),
    )
    client = ClientOptions(
        # resolved here: workers on other nodes do not see this process's environment
        token=resolve_token(args.token),
        tls_ca=_absolute(args.tls_ca),
        tls_cert=_absolute(args.tls_cert),
        tls_key=_absolute(args.tls_key),
        wire_dtype=args.wire_dtype,
        prefetch=args.label_prefetch,
        max_message_bytes=args.label_chunk_bytes,
    )
    request = StudentRequest(
        teachers=teachers,
        distill=not args.no_distill,
        checkpoint=args.checkpoint,
        client=client,
        replicas=dataclasses.replace(replica_plan(cfg.serve), num_cpus=args.replica_cpus),
        write_through=cfg.serve.write_through,
    )
    outcome = train_student(cfg, request, storage=args.storage)
    best = outcome.best
    status = "stopped early, " if outcome.stopped_early else ""
    restarts = f", {outcome.attempts} restart(s) from a checkpoint" if outcome.attempts else ""
    print(
        f"student {cfg.run_name!r} ({outcome.experiment.name}): {outcome.epochs_done} epoch(s) "
        f"({status}{'trained' if outcome.trained else 'already complete'}{restarts})"
    )
    print(f"best: epoch {best.epoch + 1}, val_mae {best.val_mae:.4f}, version {best.version}")
    print(best.path)
    return 0
