"""Distillation quality on real data: Los-loop and the PEMS08 prefix, over several seeds.

For each dataset (its preset of the same name, H = 12):

1. ingest the shared source files into ``<storage>/datasets/<name>.zarr`` (once);
2. ``stkd distill --seeds N`` with ``serve.mode=cache``: the preset's teacher (trained once), its
   label cache, the distilled and the scratch ``mlp`` student for each of the N seeds (each pair
   on the same shard plans and initialisation), the side-by-side evaluation (test MAE, parameters,
   CPU latency of one batch), the statistics (``kd_vs_scratch``, ``teacher_check``) and the report;
3. the other teacher family (``stkd train-teacher`` with the same data, schedule and seed), and
   its test MAE (``stkd evaluate``'s code path), so both teachers are compared on the same split.

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
GAP_CLOSED = 0.30  # share of the scratch -> teacher MAE gap the distilled students close
P_VALUE = 0.05  # paired t-test, on at least one dataset

#: the other teacher family of each comparison: (registry key, kwargs), used when the preset's
#: teacher is not it (Graph WaveNet with the widths of its paper and 4 x 2 layers, or STAEformer)
OTHER_TEACHERS = {
    "stgnn": (
        "staeformer",
        {"temporal_layers": 1, "spatial_layers": 1, "adaptive_dim": 32, "dropout": 0.1},
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
    seeds: int
    overrides: list[str]
    metrics: dict[str, Any]  # metrics.json of the distill run (kd_vs_scratch included)
    config: Any  # its resolved Config
    teacher: dict[str, Any]  # its teacher stage info (version, val MAE, epochs)
    other: dict[str, Any] = field(default_factory=dict)  # the other teacher: key, mae, params, ...
    commands: list[Timed] = field(default_factory=list)


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
    other_overrides: list[str] = [],  # noqa: B006  (read only)
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
        ds, seeds, overrides, metrics, config, stages["teacher"]["info"], commands=cmds
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
    """The settings a dataset's runs used (from the distill run's resolved ``config.yaml``)."""
    d, t, s, k = cfg.data, cfg.teacher, cfg.student, cfg.distill

    def kw(kwargs: dict[str, Any]) -> str:
        return ", ".join(f"{key}={value}" for key, value in kwargs.items()) or "defaults"

    def sched(section: Any) -> str:
        sc, o = section.schedule, section.optim
        patience = sc.early_stopping_patience
        stop = f", early-stopping patience {patience}" if patience else ""
        least = f" after at least {sc.min_epochs} epochs" if patience and sc.min_epochs else ""
        return f"lr {o.lr:g}, up to {sc.epochs} epochs ({sc.kind}{stop}{least})"

    loss = ", ".join(
        f"{f}={getattr(k, f)}" for f in ("alpha", "beta", "margin", "match") if getattr(k, f)
    )
    return (
        f"Settings (preset `{d.dataset}` as resolved for these runs): data L={d.input_steps}, "
        f"H={d.horizon}, batch {d.batch_size} per worker, per-node statistics "
        f"{'on' if d.per_node_stats else 'off'}, {cfg.cluster.describe_workers()} workers; teacher "
        f"`{t.model}` ({kw(t.kwargs)}; {sched(t)}); student `{s.model}` ({kw(s.kwargs)}; "
        f"{sched(s)}); distillation `{k.loss}` ({loss})."
    )


def dataset_section(r: DatasetResult) -> list[str]:
    m, o = r.metrics, r.other
    t, s = m["teacher"], m["student_kd"]
    kvs = m["kd_vs_scratch"]
    lv, ha = m["last_value"]["mae"], m["historical_average"]["mae"]
    params_ratio = t["params"] / s["params"]
    latency_ratio = t["latency_ms"] / s["latency_ms"]
    first = kvs["seeds"][0]
    kd, scratch = kvs["kd"]["mae"], kvs["scratch"]["mae"]
    tkey = r.config.teacher.model
    lines = [
        f"### {r.dataset.name}",
        "",
        settings_line(r.config),
        "",
        f"{r.dataset.describe}; dataset fingerprint `{m['dataset']['fingerprint']}`. Teacher "
        f"`{r.teacher['version']}` ({r.teacher['epochs']} epochs, validation MAE "
        f"{r.teacher['val_mae']:.3f}); the other teacher `{o['version']}` (best after epoch {o['best_epoch']}, "
        f"validation MAE {o['val_mae']:.3f}). Test split, original units; latency: one batch of "
        f"{t['latency_batch_size']} windows on 1 CPU thread, median of the timed passes, all "
        "models measured side by side in one process.",
        "",
        f"| model (students: seed {first}) | test MAE | RMSE | MAPE % | params | latency ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("teacher", f"teacher ({tkey}, the preset's)"),
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
    lines.append(
        f"| teacher ({o['key']}, for comparison) | {o['mae']:.3f} | {o['rmse']:.3f} | "
        f"{o['mape']:.2f} | {o['params']:,} | – |"
    )
    p, g, ci = kvs["p_value"], kvs["gap_closed"], kvs["ci95"]
    gap = "undefined (the teacher is not better)" if g is None else f"{100 * g:.0f} %"
    lines += [
        "",
        f"Distilled vs scratch student over {len(kd)} seeds ({', '.join(map(str, kvs['seeds']))};"
        " one teacher; `kd_vs_scratch` of the run's `metrics.json`):",
        "",
        "| student | test MAE mean ± std | per seed |",
        "|---|---:|---|",
        f"| distilled | {_mean_std(kd)} | {', '.join(f'{v:.3f}' for v in kd)} |",
        f"| no distillation | {_mean_std(scratch)} | {', '.join(f'{v:.3f}' for v in scratch)} |",
        "",
        f"Mean difference (distilled − scratch) {kvs['mean_difference']:+.3f}, bootstrap 95 % "
        f"interval [{ci[0]:+.3f}, {ci[1]:+.3f}], paired t-test p = {p:.3g}; the distilled "
        f"student wins in {kvs['wins']} of {len(kd)} seeds; gap closed {gap}. Verdict of the "
        f"report: {kvs['verdict']}.",
        "",
        "| target | measured | verdict |",
        "|---|---:|:---|",
    ]
    for name, mae in ((tkey, t["mae"]), (o["key"], o["mae"])):
        lines.append(
            f"| teacher `{name}` beats last value and historical average | {mae:.3f} vs "
            f"{lv:.3f} / {ha:.3f} | {_verdict(mae < lv and mae < ha)} |"
        )
    lines += [
        f"| distilled beats scratch on mean test MAE | {kvs['kd']['mean']:.3f} vs "
        f"{kvs['scratch']['mean']:.3f} | {_verdict(kvs['mean_difference'] < 0)} |",
        f"| p < {P_VALUE} (needed on at least one dataset) | {p:.3g} | "
        f"{'pass' if p < P_VALUE else 'not here'} |",
        f"| gap closed >= {100 * GAP_CLOSED:.0f} % | {gap} | "
        f"{_verdict(g is not None and g >= GAP_CLOSED)} |",
        f"| parameters <= 1/{PARAMS_RATIO:.0f} of the teacher's | 1/{params_ratio:.1f} | "
        f"{_verdict(params_ratio >= PARAMS_RATIO)} |",
        f"| CPU batch latency >= {LATENCY_RATIO:.0f}x lower | {latency_ratio:.1f}x | "
        f"{_verdict(latency_ratio >= LATENCY_RATIO)} |",
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
    if len(results) > 1:
        ps = [r.metrics["kd_vs_scratch"]["p_value"] for r in results]
        lines += [
            f"p < {P_VALUE} on at least one dataset: {_verdict(min(ps) < P_VALUE)} "
            f"(p = {', '.join(f'{p:.3g}' for p in ps)}).",
            "",
        ]
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
    print(text)
    if not args.no_write:
        from bench import results as results_md

        results_md.write_section(HEADING, text)
        print(f"wrote the section {HEADING!r} of {results_md.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
