"""``stkd demo``: the whole distillation pipeline on an embedded default dataset, in minutes.

The demo is a list of stages run in order on a shared :class:`DemoContext`:

1. ``dataset``: synthesise the ``demo`` dataset under the storage root (or reuse it when it was
   made with the same parameters), unless ``--data`` names one;
2. ``info``: describe it (as ``stkd info``);
3. ``distill``: ``stkd distill`` with the ``demo`` preset on it (teacher, soft labels, distilled
   and baseline students, evaluation, report), ending with the summary table and the report path.

Re-running reuses the dataset and skips the pipeline stages already complete.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Console

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands.synth import block_progress
from stkd_dist.info import dataset_info, render_info
from stkd_dist.location import Location, PathInput
from stkd_dist.pipeline.stages import (
    DEMO_DATASET,
    DEMO_NODES,
    DEMO_STEPS,
    demo_spec,
    synthesize_demo,
)
from stkd_dist.storage import open_store
from stkd_dist.synth import SynthSpec

DEMO_NAME = DEMO_DATASET
DEMO_PRESET = "demo"
DEMO_RUN = "demo"

EPILOG = f"""\
examples:
  stkd demo                            # synthesise (or reuse) '{DEMO_NAME}', distil, report
  stkd demo --run-name demo2           # a fresh run next to the first one
  stkd demo --data los-loop --run-name los-demo   # the same pipeline on an ingested dataset
  stkd --storage /tmp/stkd demo        # keep everything under another storage root

The run lives in <storage>/runs/<run-name>/ (see `stkd distill --help`); running the demo again
reuses the dataset and skips the stages already complete. Sized for a 2-core laptop: a few
minutes end to end.
"""


@dataclass
class DemoContext:
    """State shared by the demo stages.

    Attributes:
        data: ``--data`` (a store path or dataset name), or None for the embedded default.
        spec: parameters of the embedded default dataset.
        console: where stages print.
        run_name: the pipeline run (``<storage>/runs/<run_name>``).
        storage: ``--storage`` (None: ``$STKD_STORAGE`` or ``./storage``).
        debug: forward the Ray workers' output.
        dataset: path of the dataset store, set by the ``dataset`` stage.
        created: whether the ``dataset`` stage generated it (False: reused).
        outcome: the pipeline's outcome, set by the ``distill`` stage.
        timings: seconds per finished stage.
    """

    data: str | None
    spec: SynthSpec
    console: Console
    run_name: str = DEMO_RUN
    storage: str | None = None
    debug: bool = False
    dataset: Location | None = None
    created: bool = False
    outcome: object | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One step of the demo: a name for the log and a function of the context."""

    name: str
    run: Callable[[DemoContext], None]


def ensure_demo_dataset(spec: SynthSpec, storage: PathInput | None = None) -> tuple[Location, bool]:
    """The embedded default dataset ``demo`` under the storage root: ``(path, created)``.

    Generated from ``spec`` when absent, damaged or made with other parameters; reused otherwise.
    """
    with block_progress(f"demo dataset ({spec.steps} steps x {spec.nodes} nodes)") as on_block:
        return synthesize_demo(spec, storage, on_block)


def stage_dataset(ctx: DemoContext) -> None:
    """Resolve ``--data`` or ensure the embedded default dataset."""
    if ctx.data is not None:
        ctx.dataset = open_store(ctx.data).path
        ctx.console.print(f"using dataset {ctx.dataset}", soft_wrap=True)
        return
    ctx.dataset, ctx.created = ensure_demo_dataset(ctx.spec, ctx.storage)
    verb = "synthesised" if ctx.created else "reusing"
    ctx.console.print(
        f"{verb} dataset {DEMO_NAME!r} ({ctx.spec.steps} steps x {ctx.spec.nodes} nodes, "
        f"seed {ctx.spec.seed}) at {ctx.dataset}",
        soft_wrap=True,
    )


def stage_info(ctx: DemoContext) -> None:
    """Describe the dataset (as ``stkd info``)."""
    assert ctx.dataset is not None, "the dataset stage runs first"
    ctx.console.print(render_info(dataset_info(open_store(ctx.dataset))))


def demo_overrides(ctx: DemoContext) -> list[str]:
    """The ``--set`` items turning the ``demo`` preset into this demo's config."""
    assert ctx.dataset is not None, "the dataset stage runs first"
    data = ctx.data if ctx.data is not None else DEMO_NAME
    return [f"data.dataset={json.dumps(str(data))}", f"run.name={json.dumps(ctx.run_name)}"]


def stage_distill(ctx: DemoContext) -> None:
    """Run the distillation pipeline with the ``demo`` preset on the dataset."""
    from stkd_dist.config import load_config
    from stkd_dist.pipeline.distill import run_distill
    from stkd_dist.pipeline.ui import PipelineUI

    cfg = load_config(DEMO_PRESET, demo_overrides(ctx))
    ctx.outcome = run_distill(
        cfg, storage=ctx.storage, ui=PipelineUI(ctx.console), worker_logs=ctx.debug
    )


#: The demo pipeline, in order.
STAGES: list[Stage] = [
    Stage("dataset", stage_dataset),
    Stage("info", stage_info),
    Stage("distill", stage_distill),
]


def run_stages(ctx: DemoContext, stages: Sequence[Stage] = STAGES) -> DemoContext:
    """Run ``stages`` in order on ``ctx``, timing each."""
    for i, stage in enumerate(stages, 1):
        ctx.console.rule(f"demo [{i}/{len(stages)}] {stage.name}", style="bold")
        t = time.perf_counter()
        stage.run(ctx)
        ctx.timings[stage.name] = time.perf_counter() - t
    return ctx


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` parser."""
    p = subparsers.add_parser(
        "demo",
        help=SUMMARIES["demo"],
        description=(
            f"Run the distillation pipeline end to end (`stkd distill --config {DEMO_PRESET}`). "
            f"Without --data it first synthesises a small dataset named {DEMO_NAME!r} under the "
            f"storage root ({DEMO_NODES} sensors x {DEMO_STEPS} steps at 5 min by default), "
            "reusing it on later runs with the same parameters. Ends with the summary table "
            "and the path of the report."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="store path or dataset name to use instead of the default")
    p.add_argument(
        "--run-name", default=DEMO_RUN, help=f"run name under <storage>/runs (default {DEMO_RUN})"
    )
    p.add_argument("--nodes", type=int, default=DEMO_NODES, help=f"sensors (default {DEMO_NODES})")
    p.add_argument(
        "--steps", type=int, default=DEMO_STEPS, help=f"5-min steps (default {DEMO_STEPS})"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``stkd demo``; user errors propagate as StkdError to the CLI."""
    from stkd_dist.commands.distill import finish
    from stkd_dist.paths import check_name

    check_name(args.run_name, "run-name")
    console = Console()
    ctx = DemoContext(
        data=args.data,
        spec=demo_spec(nodes=args.nodes, steps=args.steps, seed=args.seed),
        console=console,
        run_name=args.run_name,
        storage=args.storage,
        debug=args.debug,
    )
    run_stages(ctx)
    finish(ctx.outcome)
    total = sum(ctx.timings.values())
    console.print(f"demo finished in {total:.1f} s")
    return 0
