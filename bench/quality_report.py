"""The section ``## Distillation quality on real data`` of ``bench/RESULTS.md``, from what
:mod:`bench.quality` measured: per dataset, the settings, the models side by side, the seed
statistics and the targets with their verdicts.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.timed import Timed

HEADING = "## Distillation quality on real data"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STKD_SHARED_DATA", REPO.parent / "shared" / "data"))

PARAMS_RATIO = 10.0  # teacher params / student params >= this
LATENCY_RATIO = 5.0  # teacher latency / student latency >= this
GAP_CLOSED = 0.30  # share of the scratch -> teacher MAE gap the distilled students close
P_VALUE = 0.05  # paired t-test, on at least one dataset


@dataclass(frozen=True)
class Dataset:
    """A real dataset: its name (= preset name) and the ``stkd ingest`` arguments.

    ``{data}`` in the arguments stands for the shared data folder.
    """

    name: str
    ingest: tuple[str, ...]
    describe: str


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
    other_overrides: list[str] = field(default_factory=list)  # for the other teacher only


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _also(overrides: list[str]) -> str:
    return f" (also {', '.join(f'`{o}`' for o in overrides)})" if overrides else ""


def _spread(kvs: dict[str, Any]) -> str:
    sp = kvs.get("spread")
    if not sp:
        return ""
    return (
        f" Seed-to-seed standard deviation {sp['kd_sd']:.3f} distilled vs {sp['scratch_sd']:.3f} "
        f"scratch, Pitman–Morgan p = {sp['p_value']:.3g}."
    )


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
        f"{r.teacher['val_mae']:.3f}); the other teacher `{o['version']}`{_also(r.other_overrides)} "
        f"(best after epoch {o['best_epoch']}, "
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
        f"student wins in {kvs['wins']} of {len(kd)} seeds; gap closed {gap}.{_spread(kvs)} "
        f"Verdict of the report: {kvs['verdict']}.",
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
        f"| distilled better with p < {P_VALUE} (needed on at least one dataset) | {p:.3g} | "
        f"{'pass' if _helped(kvs) else 'not here'} |",
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
        entries = [r.metrics["kd_vs_scratch"] for r in results]
        ps = ", ".join(f"{e['p_value']:.3g} ({e['mean_difference']:+.3f})" for e in entries)
        lines += [
            f"Distilled student better with p < {P_VALUE} on at least one dataset: "
            f"{_verdict(any(map(_helped, entries)))} (p, mean difference distilled − scratch: "
            f"{ps}).",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _helped(kvs: dict[str, Any]) -> bool:
    """Whether the distilled students are better with p < P_VALUE (a significant loss is not)."""
    return bool(kvs["mean_difference"] < 0 and kvs["p_value"] < P_VALUE)


def _display(argv: list[str]) -> list[str]:
    """A command as a user types it: ``stkd`` instead of the interpreter, repo-relative paths."""
    out = ["stkd", *argv[3:]] if argv[1:3] == ["-m", "stkd_dist.cli"] else list(argv)
    return [
        a.replace(str(REPO) + os.sep, "").replace(str(SHARED_DATA), "../shared/data") for a in out
    ]
