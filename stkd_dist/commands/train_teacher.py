"""``stkd train-teacher``: data-parallel teacher training on Ray Train."""

from __future__ import annotations

import argparse

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands._common import add_config_args, config_from_args, warn_untrained_weekdays

EPILOG = """\
examples:
  stkd train-teacher --config demo
  stkd train-teacher --config los-loop --workers 2 --epochs 30 --run-name los
  stkd train-teacher --config my-run.yaml --set teacher.optim.lr=3e-4 --address auto

The run lives in <storage>/runs/<run-name>/ (config.yaml, teacher/epoch_NNNN checkpoints,
teacher/history.jsonl, teacher/best.json). Running the same run name again resumes it from its
latest checkpoint; a finished run is not trained again. With cluster.max_failures > 0 a failed
worker is replaced and training continues from the latest checkpoint.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-teacher",
        help=SUMMARIES["train-teacher"],
        description=(
            "Train the teacher model of a config with DDP on Ray Train (gloo on CPU, NCCL on "
            "GPU): each worker reads only its shard of every epoch, validation metrics are "
            "all-reduced, a checkpoint is kept per epoch (the best N by validation MAE plus the "
            "latest). Ends by printing the best checkpoint."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stkd_dist.train.teacher import train_teacher

    cfg = config_from_args(args, roles=("teacher",))
    warn_untrained_weekdays(cfg, args.storage, "teacher")
    outcome = train_teacher(cfg, storage=args.storage)
    best = outcome.best
    status = "stopped early, " if outcome.stopped_early else ""
    restarts = f", {outcome.attempts} restart(s) from a checkpoint" if outcome.attempts else ""
    print(
        f"teacher {cfg.run_name!r}: {outcome.epochs_done} epoch(s) ({status}"
        f"{'trained' if outcome.trained else 'already complete'}{restarts})"
    )
    print(f"best: epoch {best.epoch + 1}, val_mae {best.val_mae:.4f}, version {best.version}")
    print(best.path)
    return 0
