"""``stkd evaluate``: a checkpoint's metrics next to the naive baselines."""

from __future__ import annotations

import argparse
import json

from stkd_dist.commands import SUMMARIES

EPILOG = """\
examples:
  stkd evaluate --checkpoint los                    # run name: its best teacher checkpoint
  stkd evaluate --checkpoint storage/runs/los/teacher/epoch_0007 --data los-loop --json
  stkd evaluate --checkpoint los --split val --batch-size 256

--json prints one object: {"model": {mae, rmse, mape, mae_per_horizon, ...}, "last_value": {...},
"historical_average": {...}, "checkpoint", "version", "dataset", "split"}.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help=SUMMARIES["evaluate"],
        description=(
            "Evaluate a checkpoint (masked MAE, RMSE, MAPE overall and per horizon step, in "
            "original units) next to the last-value and historical-average baselines. The store "
            "must have the fingerprint of the dataset the checkpoint was trained on."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="checkpoint directory, run dir or run name",
    )
    parser.add_argument(
        "--data", metavar="STORE", help="store path or dataset name (default: the checkpoint's)"
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--batch-size", type=int, metavar="B", help="windows per batch")
    parser.add_argument(
        "--role", default="teacher", help="experiment of a run name or run dir (default: teacher)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stkd_dist.errors import InputError
    from stkd_dist.train.evaluate import evaluate_checkpoint

    if args.batch_size is not None and args.batch_size <= 0:
        raise InputError(f"must be > 0, got {args.batch_size}", where="--batch-size")
    err = Console(stderr=True)
    with err.status(f"evaluating {args.checkpoint} on the {args.split} split ..."):
        report = evaluate_checkpoint(
            args.checkpoint,
            data=args.data,
            split=args.split,
            batch_size=args.batch_size,
            role=args.role,
            storage=args.storage,
        )
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    table = Table(title=f"{report.version} on {report.dataset} ({report.split} split)")
    for col in ("model", "MAE", "RMSE", "MAPE %"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = {"checkpoint": report.model, **report.baselines}
    for name, r in rows.items():
        table.add_row(name, f"{r.mae:.4f}", f"{r.rmse:.4f}", f"{r.mape:.2f}")
    Console().print(table)
    h = report.model.mae_h
    print("checkpoint MAE per horizon step: " + " ".join(f"{v:.3f}" for v in h))
    print(f"checkpoint: {report.checkpoint}")
    return 0
