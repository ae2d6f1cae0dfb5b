"""``stkd sweep``: a Ray Tune sweep of student and distillation settings over one shared teacher."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands._common import add_config_args, flag_overrides

EPILOG = """\
examples:
  # a preset's own sweep (every preset ships one: space, samples, max_epochs)
  stkd sweep --config los-loop

  # sweep a config's students over the run's own teacher (trained first if missing)
  stkd sweep --config my-sweep.yaml --samples 16

  # reuse a trained teacher (checkpoint directory or run name) and a Ray cluster
  stkd sweep --config my-sweep.yaml --checkpoint my-run --address auto --run-name sweep1

  # the search space lives in the config's sweep section, e.g.
  #   sweep:
  #     samples: 12
  #     max_epochs: 8
  #     scheduler: asha          # or pbt (perturbation_interval: epochs between perturbations)
  #     max_failures: 2          # restarts of a crashed trial from its latest checkpoint
  #     space:
  #       distill.alpha: {uniform: [0.2, 0.9]}
  #       student.optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
  #       student.model: {choice: [mlp, linear]}
  #       student.kwargs.embed_dim: {choice: [16, 32, 64]}
  stkd sweep --config demo --set 'sweep.space={distill.alpha: {uniform: [0.2, 0.9]}}'

  # Population Based Training instead of ASHA
  stkd sweep --config demo --set sweep.scheduler=pbt

  # labels from the run's label cache, filled before the trials (default: streamed from
  # serve.replicas teacher replicas that write through to it)
  stkd sweep --config los-loop --set sweep.labels=cache

  # data-parallel trials: each trial a Ray Train run of 2 DDP workers (1 CPU each)
  stkd sweep --config los-loop --set sweep.trial_workers=2 --address auto

Results go to <storage>/runs/<run>/sweep/: leaderboard.csv, pareto.csv, summary.json (the
teacher forward passes the sweep cost, why each trial stopped, its worker processes, the PBT
exploits) and best/ (the best student's checkpoint, config.yaml and metrics.json); report.md and
report.html of the run are rendered again. Interrupted (Ctrl-C, killed)?
Run the same command again: the Tune experiment in sweep/tune is restored and finished trials are
kept.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` parser."""
    parser = subparsers.add_parser(
        "sweep",
        help=SUMMARIES["sweep"],
        description=(
            "Sample student and distillation settings from the config's sweep.space, train a "
            "student per sample with Ray Tune (ASHA stops unpromising trials early, or PBT "
            "continues the worst from the best ones' checkpoints with mutated settings), all "
            "distilling from ONE teacher: the trials' workers stream its soft labels from teacher "
            "replicas the sweep starts, which compute each window once and write it through to "
            "the run's label cache (sweep.labels: stream), or read the cache filled before the "
            "trials (sweep.labels: cache). Each trial keeps its best checkpoints by validation MAE; at the end every "
            "trial's best checkpoint is evaluated on the test split, the leaderboard and the "
            "Pareto front (parameters vs test MAE) are written and the best student is exported, "
            "next to a greedy weight soup of the trials and a top-k ensemble (rows soup and "
            "ensemble of the leaderboard, compared with the best trial)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    group = parser.add_argument_group("sweep")
    group.add_argument("--samples", type=int, metavar="N", help="trials to draw (sweep.samples)")
    group.add_argument(
        "--max-epochs",
        type=int,
        metavar="N",
        help="epochs of an unstopped trial (sweep.max_epochs)",
    )
    group.add_argument(
        "--checkpoint",
        metavar="CKPT|RUN",
        help="teacher checkpoint, run directory or run name (default: the run's own teacher, "
        "trained first when missing; --epochs then sets its epochs)",
    )
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.samples is not None:
        out.append(f"sweep.samples={json.dumps(args.samples)}")
    if args.max_epochs is not None:
        out.append(f"sweep.max_epochs={json.dumps(args.max_epochs)}")
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    return str(value)


def top_table(rows: Sequence[Any], top: int, pareto: set[str]) -> Table:
    """The final table: the best ``top`` trials by validation MAE (``*`` marks the Pareto front)."""
    table = Table(title=f"top {min(top, len(rows))} of {len(rows)} trials (by validation MAE)")
    # the model column already shows a swept student.model
    keys = [k for k in (rows[0].settings if rows else {}) if k != "student.model"]
    for name in ("#", "trial", "model", "params", "val_mae", "test_mae", "epochs", *keys):
        table.add_column(name, justify="left" if name in ("trial", "model") else "right")
    for i, r in enumerate(rows[:top], 1):
        mark = "*" if r.trial in pareto else ""
        table.add_row(
            str(i),
            r.trial + mark,
            r.model,
            f"{r.params:,}",
            _fmt(r.val_mae),
            _fmt(r.test_mae),
            str(r.epochs),
            *(_fmt(r.settings.get(k)) for k in keys),
        )
    table.caption = "* on the Pareto front of parameters vs test MAE"
    return table


def run(args: argparse.Namespace) -> int:
    """Run ``stkd sweep``."""
    from stkd_dist.config import load_config
    from stkd_dist.pipeline.sweep import run_sweep
    from stkd_dist.pipeline.ui import PipelineUI

    # Trials of small students checkpoint every few seconds; with keep_best Tune then snapshots
    # its (small) experiment state as often and warns about it at every trial: not a problem here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # the flags go after --set, so they win (and are type-checked the same way); --epochs is the
    # teacher's (trials run sweep.max_epochs)
    cfg = load_config(
        args.config, [*args.overrides, *flag_overrides(args, ("teacher",)), *_overrides(args)]
    )
    # status lines, stage headers and progress on stderr; the results table on stdout
    outcome = run_sweep(
        cfg,
        checkpoint=args.checkpoint,
        storage=args.storage,
        ui=PipelineUI(Console(stderr=True)),
    )
    if outcome.interrupted:
        return 130
    summary = outcome.summary
    pareto = set(summary.get("pareto", []))
    out = Console()
    if not out.is_terminal:  # a log file: wide enough for every column instead of 80 characters
        out = Console(width=200)
    out.print(top_table(outcome.rows, cfg.sweep.top, pareto))
    labels = summary["labels"]
    best = outcome.best
    assert best is not None, "a finished sweep has a best trial"
    print(
        f"teacher forward passes: {labels['teacher_windows_computed']} windows for "
        f"{summary['trials']} trials ({labels['distinct_windows']} distinct windows; the trials "
        f"read {labels['trial_label_reads']} labels "
        f"{'streamed from the replicas' if labels['mode'] == 'stream' else 'from the cache'})"
    )
    print(
        f"best trial {best.trial}: val_mae {best.val_mae:.4f}, test_mae {best.test_mae:.4f}, "
        f"{best.params:,} parameters"
    )
    print(f"exported to {outcome.layout.best}")
    print(f"leaderboard {outcome.layout.leaderboard}")
    return 0
