"""``stkd distill``: teacher, soft labels, distilled and baseline students, evaluation, report."""

from __future__ import annotations

import argparse
import json

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands._common import add_config_args, config_from_args

EPILOG = """\
examples:
  stkd distill --config demo                          # the embedded default (synthesised if absent)
  stkd distill --config los-loop --run-name los       # Los-loop (ingest it first, see the preset)
  stkd distill --config my-run.yaml --set serve.mode=cache --set serve.batch_size=256
  stkd distill --config demo --teacher 10.0.0.5:50051,10.0.0.6:50051   # running teacher servers
  stkd distill --config los-loop --address auto --workers 8   # on a node of a Ray cluster
  stkd distill --config los-loop --seeds 5            # does distillation help here? 5 seeds each
  stkd distill --config los-loop --teacher-data pems08 --set teacher.model=stgnn_inductive
                                                      # a teacher from another network (transfer)

Stages: dataset, teacher, [transfer], [labels], student_kd, student_scratch, [the students of further seeds],
evaluate, statistics, report. Everything lives
in <storage>/runs/<run-name>/: config.yaml, stages.json, teacher/, student_kd/, student_scratch/,
labels/ (serve.mode=cache), metrics.json, history.json, forecasts.npz, locations.npz, report.md,
report.html, logs/. Running the same run name again skips the stages already complete (stages.json)
and resumes an interrupted training from its latest checkpoint.

Soft labels (config section `serve`): mode=stream starts serve.replicas teacher servers as Ray
actors and every student worker streams its own shard's labels from them (or from the servers
given with --teacher); mode=cache runs the teacher once over the training windows into a label
cache the workers read. `stkd --debug distill ...` also shows the Ray workers' own output.

--seeds N (run.seeds) trains the distilled and the scratch student with seeds run.seed ...
run.seed+N-1 against the one teacher (each pair on the same shard plans and initialisation) and
writes kd_vs_scratch to metrics.json: the per-seed test MAEs, the mean difference, the paired
t-test p-value, a bootstrap 95 % interval and gap_closed (the share of the scratch-to-teacher MAE
gap the distilled students close); the report says in plain words whether distillation helped.

--teacher-data SOURCE (teacher.dataset) trains the teacher on SOURCE, then the transfer stage
writes it as a teacher of --data: its trained weights with --data's graph, statistics and
fingerprint (teacher_transfer/), channels matched by name. Labels, students and the evaluation
are all on --data; the teacher row of the report is the transferred teacher on --data.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` parser."""
    parser = subparsers.add_parser(
        "distill",
        help=SUMMARIES["distill"],
        description=(
            "Run the whole distillation pipeline of a config on a Ray cluster (a local one by "
            "default): train the teacher with data-parallel workers, serve its soft labels "
            "(teacher replicas as Ray actors, or a label cache), train the distilled student and "
            "the same student without distillation, evaluate them next to the teacher and the "
            "naive baselines on the test split (metrics, CPU latency, per-sensor errors) and "
            "write the report. Resumable by run name."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument(
        "--teacher",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="stream soft labels from these running teacher servers (serve.endpoints) instead "
        "of starting replicas; they should serve this run's teacher",
    )
    parser.add_argument(
        "--teacher-data",
        metavar="STORE",
        help="train the teacher on this other dataset (teacher.dataset) and transfer it to "
        "--data: its labels of --data's windows teach the students (needs a transferable "
        "teacher.model, e.g. stgnn_inductive)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="train both students with N seeds each and compare them (run.seeds; default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print metrics.json at the end")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``stkd distill``."""
    from stkd_dist.pipeline.distill import run_distill

    if args.teacher:
        args.overrides = [*args.overrides, f"serve.endpoints={json.dumps(args.teacher)}"]
    if args.seeds is not None:
        args.overrides = [*args.overrides, f"run.seeds={args.seeds}"]
    if args.teacher_data:
        args.overrides = [*args.overrides, f"teacher.dataset={json.dumps(args.teacher_data)}"]
    cfg = config_from_args(args)
    outcome = run_distill(cfg, storage=args.storage, worker_logs=args.debug)
    return finish(outcome, as_json=args.json)


def finish(outcome: object, as_json: bool = False) -> int:
    """Print the stage table, the summary table and the report path of a pipeline outcome."""
    from stkd_dist.pipeline.distill import DistillOutcome
    from stkd_dist.pipeline.findings import split_findings
    from stkd_dist.pipeline.outputs import summary_rows
    from stkd_dist.pipeline.ui import PipelineUI

    assert isinstance(outcome, DistillOutcome)
    ui = PipelineUI()
    if as_json:
        print(json.dumps(outcome.metrics))
        return 0
    ui.console.rule("summary")
    ui.stage_table(outcome.stages)
    dataset = outcome.metrics.get("dataset", {})
    models, findings = split_findings(outcome.metrics)
    ui.metrics_table(
        f"test split of {dataset.get('name', '?')} ({dataset.get('nodes', '?')} sensors)",
        summary_rows(models),
    )
    check = findings.get("teacher_check")
    if check is not None and not check.get("beats_baselines", True):
        ui.echo(check["message"])
    if "kd_vs_scratch" in findings:
        ui.echo(findings["kd_vs_scratch"]["verdict"])
    ran = ", ".join(outcome.ran) or "none (everything was already complete)"
    ui.echo(f"stages run: {ran}; {outcome.seconds:.1f} s")
    ui.echo(f"report: {outcome.report}")
    return 0
