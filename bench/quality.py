"""Distillation quality on real data: Los-loop and the PEMS08 prefix.

For each dataset (its preset of the same name, H = 12):

1. ingest the shared source files into ``<storage>/datasets/<name>.zarr`` (once);
2. ``stkd distill`` with seed 0 and ``serve.mode=cache``: the teacher (trained once), its label
   cache, the distilled and the baseline ``mlp`` students, the side-by-side evaluation (test MAE,
   parameters, CPU latency of one batch) and the report;
3. for every further seed, the two students again (``stkd train-student`` with the seed-0
   teacher's label cache, and with ``--no-distill``), evaluated on the test split.

Targets (seed 0): the distilled student has at most 1/10 of the teacher's parameters, at least 5x
lower CPU batch latency, and a test MAE at most 1.10x the teacher's. Distilled vs baseline student:
test MAE mean ± std over the seeds, reported as measured. Every command is run as its own process
and timed (wall clock and CPU seconds of its whole process tree, Ray workers included). The
section ``## Distillation quality on real data`` of ``bench/RESULTS.md`` is (re)written.

Usage::

    .venv/bin/python -m bench.quality                                   # both datasets, 3 seeds
    .venv/bin/python -m bench.quality --datasets los-loop --seeds 3
    .venv/bin/python -m bench.quality --set student.schedule.epochs=5 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADING = "## Distillation quality on real data"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STKD_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_STORAGE = REPO / "bench" / "out" / "quality"

PARAMS_RATIO = 10.0  # teacher params / student params >= this
LATENCY_RATIO = 5.0  # teacher latency / student latency >= this
MAE_RATIO = 1.10  # student MAE / teacher MAE <= this


@dataclass(frozen=True)
class Dataset:
    """A real dataset: its name (= preset name) and the ``stkd ingest`` arguments.

    ``{data}`` in the arguments stands for the shared data folder.
    """

    name: str
    ingest: tuple[str, ...]
    describe: str


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


# -- running commands ----------------------------------------------------------------------------
@dataclass
class Timed:
    """One command: what ran, how long, how much CPU (None where it cannot be measured)."""

    label: str
    argv: list[str]
    wall_s: float
    cpu_s: float | None
    returncode: int


def _tree_cpu(session: int, seen: dict[tuple[str, str], float]) -> None:
    """Add the CPU seconds of every live process of ``session`` to ``seen`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) != session:  # fields[3]: the session id
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        key = (pid, fields[19])  # pid and start time: a reused pid is another process
        seen[key] = max(seen.get(key, 0.0), cpu)


def run_timed(label: str, argv: list[str], log: Path) -> Timed:
    """Run ``argv`` in a new session, its output appended to ``log``; sample the session's CPU.

    Ray's workers are started by the command's own local cluster and stay in its session, so
    their CPU time is counted too (sampled once a second: the last second of a process is lost).
    """
    print(f"$ {shlex.join(argv)}", flush=True)
    linux = Path("/proc/self/stat").exists()
    seen: dict[tuple[str, str], float] = {}
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if linux:
                _tree_cpu(proc.pid, seen)
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    cpu = sum(seen.values()) if linux else None
    print(f"  {label}: exit {proc.returncode}, {wall:.0f} s wall, {cpu or 0:.0f} CPU-s", flush=True)
    return Timed(label, argv, wall, cpu, proc.returncode)


def stkd_argv(storage: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stkd_dist.cli", "--storage", str(storage), *args]


# -- one dataset ---------------------------------------------------------------------------------
@dataclass
class DatasetResult:
    """Everything measured on one dataset."""

    dataset: Dataset
    seeds: list[int]
    overrides: list[str]
    metrics: dict[str, Any]  # seed-0 metrics.json
    config: Any  # seed-0 resolved Config
    teacher: dict[str, Any]  # seed-0 teacher stage info (version, val MAE, epochs)
    kd_mae: dict[int, float] = field(default_factory=dict)
    scratch_mae: dict[int, float] = field(default_factory=dict)
    commands: list[Timed] = field(default_factory=list)


def eval_mae(storage: Path, run: str, role: str) -> float:
    """Test MAE of run ``run``'s best ``role`` checkpoint (``stkd evaluate``'s code path)."""
    from stkd_dist.train.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(run, role=role, storage=storage, baselines=False)
    return float(report.model.mae)


def run_dataset(
    ds: Dataset, storage: Path, data: Path, seeds: list[int], overrides: list[str], log: Path
) -> DatasetResult:
    """Ingest, distil with the first seed, then the students of the other seeds; collect."""
    cmds: list[Timed] = []
    sets = [a for o in overrides for a in ("--set", o)]
    store = storage / "datasets" / f"{ds.name}.zarr"
    if not store.exists():
        args = [a.format(data=data) for a in ds.ingest]
        cmds.append(
            run_timed("ingest", stkd_argv(storage, "ingest", *args, "--name", ds.name), log)
        )
        check(cmds[-1])
    base = f"quality-{ds.name}"
    first = seeds[0]
    run0 = f"{base}-s{first}"
    common = ["--config", ds.name, *sets]
    cmds.append(
        run_timed(
            f"distill (seed {first})",
            stkd_argv(
                storage,
                "distill",
                *common,
                "--set",
                "serve.mode=cache",
                "--set",
                f"run.seed={first}",
                "--run-name",
                run0,
            ),
            log,
        )
    )
    check(cmds[-1])
    run_dir = storage / "runs" / run0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    cache = run_dir / stages["labels"]["info"]["path"]
    from stkd_dist.config import read_config

    config = read_config(run_dir / "config.yaml")
    result = DatasetResult(
        ds, seeds, overrides, metrics, config, stages["teacher"]["info"], commands=cmds
    )
    result.kd_mae[first] = metrics["student_kd"]["mae"]
    result.scratch_mae[first] = metrics["student_scratch"]["mae"]
    for seed in seeds[1:]:
        run = f"{base}-s{seed}"
        per_seed = [*common, "--set", f"run.seed={seed}", "--run-name", run]
        cmds.append(
            run_timed(
                f"distilled student (seed {seed})",
                stkd_argv(storage, "train-student", *per_seed, "--labels", f"cache:{cache}"),
                log,
            )
        )
        check(cmds[-1])
        cmds.append(
            run_timed(
                f"baseline student (seed {seed})",
                stkd_argv(storage, "train-student", *per_seed, "--no-distill"),
                log,
            )
        )
        check(cmds[-1])
        result.kd_mae[seed] = eval_mae(storage, run, "student_kd")
        result.scratch_mae[seed] = eval_mae(storage, run, "student_scratch")
    return result


def check(t: Timed) -> None:
    if t.returncode != 0:
        raise SystemExit(f"{t.label} failed (exit {t.returncode}): {shlex.join(t.argv)}")


# -- the section ---------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**missed**"


def settings_line(cfg: Any) -> str:
    """The settings a dataset's runs used (from the seed-0 run's resolved ``config.yaml``)."""
    d, t, s, k = cfg.data, cfg.teacher, cfg.student, cfg.distill

    def kw(kwargs: dict[str, Any]) -> str:
        return ", ".join(f"{key}={value}" for key, value in kwargs.items()) or "defaults"

    def sched(section: Any) -> str:
        sc, o = section.schedule, section.optim
        patience = sc.early_stopping_patience
        stop = f", early-stopping patience {patience}" if patience else ""
        return f"lr {o.lr:g}, {sc.epochs} epochs ({sc.kind}{stop})"

    return (
        f"Settings (preset `{d.dataset}` as resolved for these runs): data L={d.input_steps}, "
        f"H={d.horizon}, batch {d.batch_size} per worker, per-node statistics "
        f"{'on' if d.per_node_stats else 'off'}, {cfg.cluster.num_workers} workers; teacher "
        f"`{t.model}` ({kw(t.kwargs)}; {sched(t)}); student `{s.model}` ({kw(s.kwargs)}; "
        f"{sched(s)}); distillation `{k.loss}` with alpha {k.alpha:g}."
    )


def _reading(teacher_mae: float, kd: list[float], scratch: list[float]) -> str:
    """One or two sentences on whether distillation helped, from the numbers alone."""
    gap = statistics.mean(kd) - statistics.mean(scratch)
    if gap <= 0:
        text = f" Distillation lowers the mean test MAE by {-gap:.3f}."
    else:
        text = f" Distillation does not help here: the mean test MAE is {gap:.3f} higher with it."
    if len(kd) >= 2 and len(scratch) >= 2:
        spread = max(statistics.stdev(kd), statistics.stdev(scratch))
        if abs(gap) < spread:
            text += (
                f" The difference is smaller than the seed-to-seed spread (std up to {spread:.3f}),"
                f" so {len(kd)} seeds do not separate the two."
            )
    if gap > 0 and teacher_mae > statistics.mean(scratch):
        text += (
            " The teacher itself is less accurate than the student trained on the targets alone, "
            "so its labels (weighted 1 - `distill.alpha` in the loss) pull the student towards "
            "larger errors."
        )
    return text


def dataset_section(r: DatasetResult) -> list[str]:
    m = r.metrics
    t, s, sc = m["teacher"], m["student_kd"], m["student_scratch"]
    params_ratio = t["params"] / s["params"]
    latency_ratio = t["latency_ms"] / s["latency_ms"]
    mae_ratio = s["mae"] / t["mae"]
    first = r.seeds[0]
    kd = [r.kd_mae[k] for k in r.seeds]
    scratch = [r.scratch_mae[k] for k in r.seeds]
    wins = sum(a < b for a, b in zip(kd, scratch, strict=True))
    lines = [
        f"### {r.dataset.name}",
        "",
        settings_line(r.config),
        "",
        f"{r.dataset.describe}; dataset fingerprint `{m['dataset']['fingerprint']}`. Teacher "
        f"`{r.teacher['version']}` ({r.teacher['epochs']} epochs, validation MAE "
        f"{r.teacher['val_mae']:.3f}). Test split, original units; latency: one batch of "
        f"{t['latency_batch_size']} windows on 1 CPU thread, median of the timed passes, all "
        "models measured side by side in one process.",
        "",
        f"| model (seed {first}) | test MAE | RMSE | MAPE % | params | latency ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("teacher", "teacher (stgnn)"),
        ("student_kd", "student, distilled (mlp)"),
        ("student_scratch", "student, no distillation (mlp)"),
        ("last_value", "last value"),
        ("historical_average", "historical average"),
    ):
        e = m[name]
        params = f"{e['params']:,}" if "params" in e else "–"
        latency = f"{e['latency_ms']:.2f}" if "latency_ms" in e else "–"
        lines.append(
            f"| {label} | {e['mae']:.3f} | {e['rmse']:.3f} | {e['mape']:.2f} | {params} | "
            f"{latency} |"
        )
    lines += [
        "",
        "| target (distilled student vs teacher) | measured | verdict |",
        "|---|---:|:---|",
        f"| parameters <= 1/{PARAMS_RATIO:.0f} | 1/{params_ratio:.1f} | "
        f"{_verdict(params_ratio >= PARAMS_RATIO)} |",
        f"| CPU batch latency >= {LATENCY_RATIO:.0f}x lower | {latency_ratio:.1f}x | "
        f"{_verdict(latency_ratio >= LATENCY_RATIO)} |",
        f"| test MAE <= {MAE_RATIO:.2f}x | {mae_ratio:.3f}x | {_verdict(mae_ratio <= MAE_RATIO)} |",
        "",
        f"Distilled vs baseline student over {len(r.seeds)} seeds ({', '.join(map(str, r.seeds))};"
        " one teacher): test MAE",
        "",
        "| student | mean ± std | per seed |",
        "|---|---:|---|",
        f"| distilled | {_mean_std(kd)} | {', '.join(f'{v:.3f}' for v in kd)} |",
        f"| no distillation | {_mean_std(scratch)} | {', '.join(f'{v:.3f}' for v in scratch)} |",
        "",
        f"The distilled student has the lower test MAE in {wins} of {len(r.seeds)} seeds "
        f"(teacher test MAE {t['mae']:.3f}; baseline student, seed {first}: {sc['mae']:.3f})."
        + _reading(t["mae"], kd, scratch),
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    for c in r.commands:
        cpu = "–" if c.cpu_s is None else f"{c.cpu_s:.0f}"
        lines.append(f"| {c.label} | {c.wall_s:.0f} | {cpu} |")
    lines.append("")
    return lines


def section(results: list[DatasetResult], argv: list[str], started: float) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores ({platform.machine()}, "
        f"CPython {platform.python_version()}) in {(time.time() - started) / 60:.0f} min; other "
        f"jobs shared the cores (1-minute load average {load[0]:.1f} at the end), so wall times "
        "are indicative and the CPU seconds (all processes of each command, Ray workers "
        "included) say more about the cost.",
        "",
        "```bash",
        shlex.join([".venv/bin/python", "-m", "bench.quality", *argv]),
        "```",
        "",
        "It runs, per dataset (`--storage` defaults to `bench/out/quality`):",
        "",
        "```bash",
    ]
    for r in results:
        lines += [shlex.join(_display(c.argv)) for c in r.commands]
    lines += ["```", ""]
    for r in results:
        lines += dataset_section(r)
    return "\n".join(lines).rstrip() + "\n"


def _display(argv: list[str]) -> list[str]:
    """A command as a user types it: ``stkd`` instead of the interpreter, repo-relative paths."""
    out = ["stkd", *argv[3:]] if argv[1:3] == ["-m", "stkd_dist.cli"] else list(argv)
    return [
        a.replace(str(REPO) + os.sep, "").replace(str(SHARED_DATA), "../shared/data") for a in out
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated, from {', '.join(DATASETS)} (default: all)",
    )
    p.add_argument("--seeds", type=int, default=3, help="student seeds, >= 1 (default 3)")
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
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names or args.seeds < 1:
        p.error(f"unknown dataset(s) {unknown} or --seeds < 1")
    if not args.data.is_dir():
        print(f"bench.quality: no shared data folder at {args.data}; skipped", file=sys.stderr)
        return 0
    storage = args.storage.absolute()
    storage.mkdir(parents=True, exist_ok=True)
    log = storage / "quality.log"
    started = time.time()
    results = [
        run_dataset(
            DATASETS[n], storage, args.data.absolute(), list(range(args.seeds)), args.overrides, log
        )
        for n in names
    ]
    text = section(results, argv, started)
    print(text)
    if not args.no_write:
        from bench import results as results_md

        results_md.write_section(HEADING, text)
        print(f"wrote the section {HEADING!r} of {results_md.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
