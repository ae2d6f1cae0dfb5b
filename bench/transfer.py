"""Transfer distillation on real data: a teacher of the PEMS08 prefix teaches Los-loop's students.

1. ingest both shared datasets into ``<storage>/datasets/`` (once, as ``bench.quality`` does);
2. for each target fraction F (default 1.0, 0.25, 0.05): ``stkd distill --config los-loop
   --teacher-data pems08-prefix --data los-loop`` with the inductive Graph WaveNet teacher,
   speed in and out on both networks, and ``data.target_fraction=F``. Each run's
   ``metrics.json`` gives, on Los-loop's test split, the transferred teacher, the distilled
   student (teacher labels on every training window, targets on the last F of the training hours),
   the same student trained on the kept targets alone, and the naive baselines.

The teacher is trained once: the teacher stage's key does not depend on ``data.target_fraction``
(it trains on the source with all its targets), so each later fraction starts from a copy of the
first run's teacher and label cache; only the transfer and the students
are redone. The section ``## Transfer distillation on real data`` of ``bench/RESULTS.md`` is
(re)written, with the plot ``bench/transfer_fractions.png``.

Usage::

    .venv/bin/python -m bench.transfer
    .venv/bin/python -m bench.transfer --fractions 1.0,0.05 --set teacher.schedule.epochs=4 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.quality import DATASETS, DEFAULT_STORAGE, REPO, SHARED_DATA
from bench.timed import run_timed, stkd_argv
from stkd_dist.report.inputs import MODEL_ORDER

HEADING = "## Transfer distillation on real data"
PLOT = REPO / "bench" / "transfer_fractions.png"
SOURCE, TARGET = "pems08-prefix", "los-loop"

#: the settings that make one teacher fit both networks: the inductive Graph WaveNet (no
#: per-node parameters) on the one channel both have, speed
TRANSFER_SET = (
    "teacher.model=stgnn_inductive",
    "teacher.kwargs={residual_channels: 16, dilation_channels: 16, skip_channels: 128, "
    "end_channels: 256, blocks: 2, layers_per_block: 2, diffusion_steps: 2, dropout: 0.3}",
    "data.input_channels=[speed]",
    "data.target_channels=[speed]",
)
ROWS = MODEL_ORDER  # the rows of metrics.json, in the report's order
LABELS = {
    "teacher": "teacher (PEMS08 prefix, transferred)",
    "student_kd": "student, transfer-KD",
    "student_scratch": "student, Los-loop targets only",
    "last_value": "last value",
    "historical_average": "historical average",
}


def ensure_store(name: str, storage: Path, data: Path, log: Path) -> None:
    """Ingest the shared dataset ``name`` into ``<storage>/datasets/<name>.zarr`` unless there."""
    if (storage / "datasets" / f"{name}.zarr").exists():
        return
    args = [a.replace("{data}", str(data)) for a in DATASETS[name].ingest]
    done = run_timed("ingest", stkd_argv(storage, "ingest", *args, "--name", name), log)
    if done.returncode != 0:
        raise SystemExit(f"bench.transfer: ingest of {name} failed; see {log}")


def run_fraction(
    fraction: float, storage: Path, overrides: list[str], log: Path, first: str | None
) -> dict[str, Any]:
    """One ``stkd distill`` at ``data.target_fraction=fraction``; its test MAEs and wall time."""
    run = f"transfer-f{fraction:g}"
    runs = storage / "runs"
    if first is not None and not (runs / run).exists():
        # the teacher stage and the label cache do not depend on the fraction: reuse them
        # (only them: a student experiment found complete would not be trained again)
        (runs / run).mkdir(parents=True)
        for part in ("teacher", "labels", "stages.json"):
            src, dst = runs / first / part, runs / run / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    sets = [*TRANSFER_SET, f"data.target_fraction={fraction}", *overrides]
    argv = stkd_argv(
        storage, "distill", "--config", TARGET, "--teacher-data", SOURCE, "--data", TARGET,
        "--run-name", run, *[x for s in sets for x in ("--set", s)],
    )  # fmt: skip
    done = run_timed(f"distill F={fraction:g}", argv, log)
    if done.returncode != 0:
        raise SystemExit(f"bench.transfer: {shlex.join(argv)} failed; see {log}")
    metrics = json.loads((runs / run / "metrics.json").read_text())
    seeds = metrics.get("kd_vs_scratch")  # run.seeds >= 2: every seed's pair of students
    return {
        "fraction": fraction,
        "run": run,
        "wall_s": done.wall_s,
        "mae": {k: float(metrics[k]["mae"]) for k in ROWS if k in metrics},
        "seeds": None
        if seeds is None
        else {
            "seeds": [int(x) for x in seeds["seeds"]],
            "kd": [float(x) for x in seeds["kd"]["mae"]],
            "scratch": [float(x) for x in seeds["scratch"]["mae"]],
            "verdict": str(seeds["verdict"]),
        },
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Test MAE against the target fraction, one line per model or baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    fractions = [r["fraction"] for r in results]
    for key in ROWS:
        ys = [_plotted(r, key) for r in results]
        style = "--" if key in ("last_value", "historical_average") else "-"
        ax.plot(fractions, ys, style, marker="o", label=LABELS[key])
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("share of Los-loop's training hours with targets (data.target_fraction)")
    ax.set_ylabel("test MAE (mph)")
    ax.set_title("PEMS08 prefix teacher -> Los-loop students")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plotted(result: dict[str, Any], key: str) -> float:
    """A model's test MAE at one fraction: the mean over seeds for the students when measured."""
    seeds = result.get("seeds")
    if seeds and key in ("student_kd", "student_scratch"):
        values = seeds["kd" if key == "student_kd" else "scratch"]
        return sum(values) / len(values)
    return float(result["mae"].get(key, float("nan")))


def section(results: list[dict[str, Any]], argv: list[str], started: float) -> str:
    """The RESULTS.md section: the command, a table per fraction, and what it shows."""
    when = dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        HEADING,
        "",
        f"`{shlex.join(['.venv/bin/python', '-m', 'bench.transfer', *argv])}` ({when}, "
        f"{time.time() - started:.0f} s). Teacher: inductive Graph WaveNet trained on the PEMS08 "
        "prefix (speed in, speed out), transferred to Los-loop with Los-loop's graph and "
        "statistics; students: the los-loop preset's `mlp`. Test MAE on Los-loop (mph):",
        "",
        "| target fraction | " + " | ".join(LABELS[k] for k in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for r in results:
        cells = [f"{r['mae'][k]:.3f}" if k in r["mae"] else "-" for k in ROWS]
        lines.append(f"| {r['fraction']:g} | " + " | ".join(cells) + " |")
    if any(r["seeds"] for r in results):
        lines += ["", "The table's students are those of `run.seed`; the plot shows the students' "
                  "mean over every seed, and the lines below give each seed's spread."]  # fmt: skip
    lines += ["", f"![test MAE by target fraction]({PLOT.name})", ""]
    for r in results:
        kd, alone = r["mae"]["student_kd"], r["mae"]["student_scratch"]
        verdict = "helps" if kd < alone else "does not help"
        text = (
            f"- F = {r['fraction']:g}: transfer-KD {kd:.3f} vs targets only {alone:.3f} "
            f"({alone - kd:+.3f}) with seed {r['seeds']['seeds'][0] if r['seeds'] else 0}: the "
            f"teacher from elsewhere {verdict}."
        )
        if r["seeds"]:
            s = r["seeds"]
            text += (
                f" Over seeds {', '.join(map(str, s['seeds']))}: transfer-KD "
                f"{_mean_sd(s['kd'])}, targets only {_mean_sd(s['scratch'])}; {s['verdict']}."
            )
        lines.append(text)
    lines.append(
        "- Targets are kept in whole hours (the last max(1, round(F x hours)) hours of the "
        "training split, one contiguous block, `data.target_fraction`); inputs, statistics, "
        "validation and test are the same at every fraction."
    )
    return "\n".join(lines) + "\n"


def _mean_sd(values: list[float]) -> str:
    import statistics

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n")[0])
    p.add_argument("--fractions", default="1.0,0.25,0.05", help="data.target_fraction values")
    p.add_argument("--storage", type=Path, default=DEFAULT_STORAGE, help="storage root")
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        p.error("--fractions: values in (0, 1]")
    if not args.data.is_dir():
        print(f"bench.transfer: no shared data folder at {args.data}; skipped", file=sys.stderr)
        return 0
    storage = args.storage.absolute()
    storage.mkdir(parents=True, exist_ok=True)
    log, started = storage / "transfer.log", time.time()
    for name in (SOURCE, TARGET):
        ensure_store(name, storage, args.data.absolute(), log)
    results: list[dict[str, Any]] = []
    for f in fractions:
        first = results[0]["run"] if results else None
        results.append(run_fraction(f, storage, args.overrides, log, first))
    text = section(results, argv, started)
    print(text)
    if not args.no_write:
        from bench import results as results_md

        plot(results, PLOT)
        results_md.write_section(HEADING, text)
        print(f"wrote {HEADING!r} of {results_md.RESULTS} and {PLOT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
