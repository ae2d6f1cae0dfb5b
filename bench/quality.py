"""Distillation quality on real data: Los-loop and the PEMS08 prefix, over several seeds.

For each dataset (its preset of the same name, H = 12):

1. ingest the shared source files into ``<storage>/datasets/<name>.zarr`` (once);
2. ``stkd distill --seeds N`` with ``serve.mode=cache``: the preset's teacher (trained once), its
   label cache, the distilled and the scratch ``mlp`` student for each of the N seeds (each pair
   on the same shard plans and initialisation), the side-by-side evaluation (test MAE, parameters,
   CPU latency of one batch), the statistics (``kd_vs_scratch``, ``teacher_check``) and the report;
3. the other teacher family (``stkd train-teacher`` with the same data, schedule and seed, plus
   any ``--other-set`` overrides), and its test MAE (``stkd evaluate``'s code path), so both
   teachers are compared on the same split.

Targets: each teacher beats last value and historical average on test MAE; the distilled student
beats the scratch student on mean test MAE on both datasets, with p < 0.05 (paired t-test) on at
least one, closing at least 30 % of the scratch→teacher gap; it has at most 1/10 of the teacher's
parameters and at least 5x lower CPU batch latency. Every command is run as its own process and
timed (wall clock and CPU seconds of its whole process tree, Ray workers included). The section
``## Distillation quality on real data`` of ``bench/RESULTS.md`` is (re)written.

Usage::

    .venv/bin/python -m bench.quality                                   # both datasets, 5 seeds
    .venv/bin/python -m bench.quality --datasets los-loop --seeds 5
    .venv/bin/python -m bench.quality --set student.schedule.epochs=5 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quality_report import (
    HEADING,
    REPO,
    SHARED_DATA,
    Dataset,
    DatasetResult,
    section,
)
from bench.results import publish
from bench.timed import Timed, check, run_timed, stkd_argv

DEFAULT_STORAGE = REPO / "bench" / "out" / "quality"

#: the other teacher family of each comparison: (registry key, kwargs), used when the preset's
#: teacher is not it (Graph WaveNet with the widths of its paper and 4 x 2 layers, or STAEformer)
OTHER_TEACHERS = {
    "stgnn": (
        "staeformer",
        # no day-of-week embedding: both stores span a week or less, their
        # training splits miss weekdays that the test splits hold (stkd_dist.data.calendar)
        {
            "temporal_layers": 1,
            "spatial_layers": 1,
            "adaptive_dim": 32,
            "dropout": 0.1,
            "dow_dim": 0,
        },
    ),
    "staeformer": (
        "stgnn",
        {
            "residual_channels": 16,
            "dilation_channels": 16,
            "skip_channels": 256,
            "end_channels": 512,
            "blocks": 4,
            "layers_per_block": 2,
            "diffusion_steps": 2,
            "dropout": 0.3,
        },
    ),
}


DATASETS = {
    "los-loop": Dataset(
        "los-loop",
        (
            "{data}/los-loop/los_speed.csv",
            "--adjacency",
            "{data}/los-loop/los_adj.csv",
            "--locations",  # Los-loop's sensors are METR-LA sensors: the report's error map
            "{data}/metr-la-graph/graph_sensor_locations.csv",
            "--channels",
            "speed",
            "--freq",
            "5min",
        ),
        "Los-loop: 207 sensors x 2016 steps of speed (5 min), 0/1 adjacency",
    ),
    "pems08-prefix": Dataset(
        "pems08-prefix",
        (
            "{data}/pems08-prefix/PEMS08_prefix_first1282steps.npy",
            "--adjacency",
            "{data}/pems08-prefix/distance.csv",
            "--channels",
            "flow,occupancy,speed",
            "--missing-value",
            "0",
            "--start",
            "2016-07-01 00:00",
        ),
        "PEMS08 prefix: 170 sensors x 1282 steps of flow/occupancy/speed, flow forecast, "
        "distance graph",
    ),
}


# -- one dataset ---------------------------------------------------------------------------------
def other_teacher(storage: Path, run: str) -> dict[str, Any]:
    """Test metrics of run ``run``'s best teacher (``stkd evaluate``'s code path)."""
    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.train.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(run, role="teacher", storage=storage, baselines=False)
    model, info = load_forecaster(run, storage=storage)
    return {
        "key": model.key,
        "version": info.version,
        "best_epoch": info.epoch + 1,
        "mae": float(report.model.mae),
        "rmse": float(report.model.rmse),
        "mape": float(report.model.mape),
        "params": model.num_params(),
        "val_mae": info.state.best_val_mae,
    }


def run_dataset(
    ds: Dataset,
    storage: Path,
    data: Path,
    seeds: int,
    overrides: list[str],
    log: Path,
    other_overrides: Sequence[str] = (),
) -> DatasetResult:
    """Ingest, distil with ``seeds`` seeds, train the other teacher family; collect.

    ``other_overrides`` apply to the other teacher family's ``train-teacher`` only.
    """
    from stkd_dist.config import load_config, read_config

    cmds: list[Timed] = []
    sets = [a for o in overrides for a in ("--set", o)]
    store = storage / "datasets" / f"{ds.name}.zarr"
    if not store.exists():
        args = [a.format(data=data) for a in ds.ingest]
        cmds.append(
            run_timed("ingest", stkd_argv(storage, "ingest", *args, "--name", ds.name), log)
        )
        check(cmds[-1])
    run = f"quality-{ds.name}"
    common = ["--config", ds.name, *sets]
    argv = [*common, "--set", "serve.mode=cache", "--seeds", str(seeds), "--run-name", run]
    cmds.append(run_timed(f"distill ({seeds} seeds)", stkd_argv(storage, "distill", *argv), log))
    check(cmds[-1])
    run_dir = storage / "runs" / run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    config = read_config(run_dir / "config.yaml")
    result = DatasetResult(
        ds,
        seeds,
        overrides,
        metrics,
        config,
        stages["teacher"]["info"],
        commands=cmds,
        other_overrides=list(other_overrides),
    )

    key, kwargs = OTHER_TEACHERS[load_config(ds.name, overrides).teacher.model]
    other_run = f"{run}-{key}"
    other_sets = ["--set", f"teacher.model={key}", "--set", f"teacher.kwargs={json.dumps(kwargs)}"]
    other_sets += [a for o in other_overrides for a in ("--set", o)]
    cmds.append(
        run_timed(
            f"teacher {key}",
            stkd_argv(storage, "train-teacher", *common, *other_sets, "--run-name", other_run),
            log,
        )
    )
    check(cmds[-1])
    result.other = other_teacher(storage, other_run)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated, from {', '.join(DATASETS)} (default: all)",
    )
    p.add_argument("--seeds", type=int, default=5, help="student seeds, >= 2 (default 5)")
    p.add_argument("--storage", type=Path, default=DEFAULT_STORAGE, help="storage root")
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every command (repeatable)",
    )
    p.add_argument(
        "--other-set",
        dest="other_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the other teacher family only (repeatable), after --set",
    )
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names or args.seeds < 2:
        p.error(f"unknown dataset(s) {unknown} or --seeds < 2")
    if not args.data.is_dir():
        print(f"bench.quality: no shared data folder at {args.data}; skipped", file=sys.stderr)
        return 0
    storage = args.storage.absolute()
    storage.mkdir(parents=True, exist_ok=True)
    log = storage / "quality.log"
    started = time.time()
    results = [
        run_dataset(
            DATASETS[n],
            storage,
            args.data.absolute(),
            args.seeds,
            args.overrides,
            log,
            args.other_overrides,
        )
        for n in names
    ]
    text = section(results, argv, started)
    publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
