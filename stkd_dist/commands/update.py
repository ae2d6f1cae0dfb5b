"""``stkd update``: fine-tune a run's teacher and student on data appended to its store."""

from __future__ import annotations

import argparse
import json

from stkd_dist.commands import SUMMARIES

EPILOG = """\
examples:
  stkd ingest new-day.csv --append --name los        # the store grows by a day
  stkd update my-run                                 # teacher v2, published; student on its labels
  stkd update my-run --days 3 --set update.teacher_epochs=4
  stkd serve --follow my-run --data los              # serves each published version

Stages (recorded in <run>/stages.json, resumable like `stkd distill`'s): dataset,
update<k>_teacher, update<k>_labels, update<k>_student, update<k>_evaluate. The teacher starts from
the newest version (the last published, else the run's), fine-tunes on the training windows of the
last update.days days (data.recent_days) and is published in <run>/published.json: servers started
with `stkd serve --follow RUN` load it for new streams, while streams in progress finish on the
version they started on. Its labels of those windows are computed once into
<run>/labels/<version>.zarr, and the student fine-tunes from its best checkpoint on them.
<run>/updates/update<k>.json compares the models before and after the update, and the naive
baselines, on the test split and on its newest update.evaluate_days days.

Run it after each `stkd ingest --append`; run again on the same store, it repeats nothing that
completed. The run's own config (<run>/config.yaml) is used, with --set overrides.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``update`` parser."""
    parser = subparsers.add_parser(
        "update",
        help=SUMMARIES["update"],
        description=(
            "Online distillation: after new time steps were appended to a run's store, fine-tune "
            "the run's teacher on them, publish the new version to the servers that follow the "
            "run, label the new windows once with it, fine-tune the student on those labels and "
            "compare the models before and after on the newest test days."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_name", metavar="RUN", help="the run to update (under <storage>/runs)")
    parser.add_argument("--days", type=int, help="fine-tune on the last N days (update.days)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the run's config, e.g. --set update.student_epochs=3",
    )
    parser.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``stkd update``."""
    from stkd_dist.config import load_config
    from stkd_dist.errors import StoreError
    from stkd_dist.location import exists, set_storage_options, url
    from stkd_dist.pipeline.run import RunLayout
    from stkd_dist.pipeline.ui import PipelineUI
    from stkd_dist.pipeline.update import run_update

    layout = RunLayout.of(args.run_name, args.storage)
    if not exists(layout.config):
        raise StoreError(
            f"no run {args.run_name!r} here (no {url(layout.config)}): run `stkd distill` first",
            where=args.run_name,
        )
    overrides = list(args.overrides)
    if args.days is not None:
        overrides.append(f"update.days={args.days}")
    cfg = load_config(layout.config, [*overrides, f"run.name={json.dumps(args.run_name)}"])
    set_storage_options(cfg.storage.options)
    ui = PipelineUI()
    outcome = run_update(cfg, storage=args.storage, ui=ui)
    if args.json:
        print(json.dumps(outcome.evaluation))
        return 0
    ev = outcome.evaluation
    ui.console.rule(f"update {outcome.number}")
    ui.stage_table(outcome.stages)
    for part, title in (("test", "test split"), ("newest", f"newest {ev['newest_days']} day(s)")):
        rows = ", ".join(f"{k} {v:.4f}" for k, v in ev[part].items())
        ui.echo(f"MAE on the {title} ({ev['windows'][part]} windows): {rows}")
    ui.echo(f"published: teacher {outcome.published.version}")
    return 0
