"""Distilling an ensemble of teachers on real data: does a stronger teacher make distillation pay?

On Los-loop the preset's teacher is barely ahead of the student trained alone (``bench.quality``),
so there is little to distil. The mean of both teacher families (Graph WaveNet and STAEformer) is
a stronger teacher; this benchmark distils it into the preset's student, with the product's own
commands, for several seeds:

1. ingest (once), ``stkd train-teacher`` for the preset's teacher and for the other family
   (``bench.quality.OTHER_TEACHERS``, 10 epochs);
2. ``stkd precompute-labels --splits train`` for each teacher;
3. per seed: ``stkd train-student`` from both label caches (``distill.ensemble: mean``), from the
   preset's teacher's cache alone, and without distillation (``--no-distill``), each pair on the
   same seed (shard plans and initialisation);
4. test MAE of the two teachers, of their mean ensemble
   (:class:`stkd_dist.pipeline.sweep_combine.MeanEnsemble`), of every student and of both naive
   baselines; :func:`stkd_dist.stats.kd_vs_scratch` for each kind of distilled student against
   the scratch students (the gap measured to the teacher it was distilled from).

Runs already complete in ``--storage`` are reused (``train-teacher`` and ``train-student`` do
not train a finished run again), so the section can be rewritten from the same models. Writes the
section ``## Distilling an ensemble of teachers: <dataset>`` of ``bench/RESULTS.md``.

Usage::

    .venv/bin/python -m bench.ensemble_teacher --seeds 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.quality import DATASETS, OTHER_TEACHERS
from bench.quality_report import REPO, SHARED_DATA
from bench.results import publish
from bench.timed import Timed, check, run_timed, stkd_argv

#: each dataset has a section of its own, so a run on one keeps the other's
HEADING = "## Distilling an ensemble of teachers: {dataset}"
DEFAULT_STORAGE = REPO / "bench" / "out" / "ensemble"
OTHER_EPOCHS = 10


def _run(cmds: list[Timed], label: str, storage: Path, log: Path, *args: str) -> None:
    cmds.append(run_timed(label, stkd_argv(storage, *args), log))
    check(cmds[-1])


def train_all(
    dataset: str,
    storage: Path,
    data: Path,
    seeds: int,
    prefix: str,
    log: Path,
    teacher_runs: tuple[str | None, str | None] = (None, None),
) -> tuple[dict[str, str], list[Timed]]:
    """Train (or reuse) the teachers, their label caches and every student; return run names.

    ``teacher_runs``: run names of the preset's and the other family's teacher (default
    ``<prefix>-<dataset>`` and ``<prefix>-<dataset>-<key>``), e.g. runs trained before."""
    from stkd_dist.config import load_config

    cmds: list[Timed] = []
    ds = DATASETS[dataset]
    if not (storage / "datasets" / f"{dataset}.zarr").exists():
        args = [a.format(data=data) for a in ds.ingest]
        _run(cmds, "ingest", storage, log, "ingest", *args, "--name", dataset)
    key, kwargs = OTHER_TEACHERS[load_config(dataset).teacher.model]
    runs = {
        "teacher": teacher_runs[0] or f"{prefix}-{dataset}",
        "other": teacher_runs[1] or f"{prefix}-{dataset}-{key}",
    }
    base = ["--config", dataset]
    _run(
        cmds,
        "teacher (preset)",
        storage,
        log,
        "train-teacher",
        *base,
        "--run-name",
        runs["teacher"],
    )
    other = ["--set", f"teacher.model={key}", "--set", f"teacher.kwargs={json.dumps(kwargs)}"]
    other += ["--set", f"teacher.schedule.epochs={OTHER_EPOCHS}"]
    _run(
        cmds,
        f"teacher {key}",
        storage,
        log,
        "train-teacher",
        *base,
        *other,
        "--run-name",
        runs["other"],
    )
    caches = []
    for role in ("teacher", "other"):
        cache = storage / "labels" / f"{runs[role]}.zarr"
        caches.append(cache)
        if not cache.exists():
            _run(
                cmds,
                f"labels {role}",
                storage,
                log,
                "precompute-labels",
                "--checkpoint",
                runs[role],
                "--data",
                dataset,
                "--splits",
                "train",
                "--out",
                str(cache),
            )
    both = [a for c in caches for a in ("--labels", f"cache:{c}")]
    for s in range(seeds):
        seed = ["--set", f"run.seed={s}"]
        ens, single = f"{prefix}-{dataset}-ensemble-s{s}", f"{prefix}-{dataset}-single-s{s}"
        runs[f"ensemble{s}"], runs[f"single{s}"] = ens, single
        train = ("train-student", *base, *seed)
        _run(cmds, f"seed {s}: from the ensemble", storage, log, *train, *both, "--run-name", ens)
        one = ("--labels", f"cache:{caches[0]}")
        _run(
            cmds,
            f"seed {s}: from the preset's teacher",
            storage,
            log,
            *train,
            *one,
            "--run-name",
            single,
        )
        _run(
            cmds,
            f"seed {s}: no distillation",
            storage,
            log,
            *train,
            "--no-distill",
            "--run-name",
            ens,
        )
    return runs, cmds


def measure(dataset: str, storage: Path, runs: dict[str, str], seeds: int) -> dict[str, Any]:
    """Test MAE of every model and baseline, and the statistics of each kind of distillation."""
    from stkd_dist.baselines import evaluate_baselines
    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.paths import resolve_dataset
    from stkd_dist.pipeline.sweep_combine import MeanEnsemble
    from stkd_dist.stats import kd_vs_scratch
    from stkd_dist.storage import open_store
    from stkd_dist.train.evaluate import predict_metrics
    from stkd_dist.train.loop import build_reader

    teacher, info = load_forecaster(runs["teacher"], "teacher", storage)
    other, _ = load_forecaster(runs["other"], "teacher", storage)
    reader = build_reader(info.config, open_store(resolve_dataset(dataset, storage)))
    batch = info.config.data.eval_batch_size

    def mae(model: Any) -> float:
        return float(predict_metrics(model, reader, "test", batch).mae)

    ensemble = MeanEnsemble([teacher, other])
    out: dict[str, Any] = {
        "teacher": {"key": teacher.key, "mae": mae(teacher), "params": teacher.num_params()},
        "other": {"key": other.key, "mae": mae(other), "params": other.num_params()},
        "ensemble": {"mae": mae(ensemble), "params": ensemble.num_params()},
        "baselines": {
            n: float(m.mae) for n, m in evaluate_baselines(reader, "test", batch).items()
        },
    }
    students: dict[str, list[float]] = {"ensemble": [], "single": [], "scratch": []}
    for s in range(seeds):
        for kind, run, role in (
            ("ensemble", runs[f"ensemble{s}"], "student_kd"),
            ("single", runs[f"single{s}"], "student_kd"),
            ("scratch", runs[f"ensemble{s}"], "student_scratch"),
        ):
            model, _ = load_forecaster(run, role, storage)
            students[kind].append(mae(model))
            out["student_params"] = model.num_params()
    out["students"] = students
    ids = list(range(seeds))
    out["ensemble_kd"] = kd_vs_scratch(
        students["ensemble"], students["scratch"], out["ensemble"]["mae"], ids
    )
    out["single_kd"] = kd_vs_scratch(
        students["single"], students["scratch"], out["teacher"]["mae"], ids
    )
    return out


def _mean_sd(values: list[float]) -> str:
    import numpy as np

    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def section(dataset: str, m: dict[str, Any], cmds: list[Timed], argv: list[str]) -> str:
    """The RESULTS section."""
    t, o, e = m["teacher"], m["other"], m["ensemble"]
    st = m["students"]
    lines = [
        HEADING.format(dataset=dataset),
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {dataset}, 2 CPU cores, with the product's "
        "commands (runs already complete in the storage are reused):",
        "",
        "```bash",
        f".venv/bin/python -m bench.ensemble_teacher {shlex.join(argv)}".rstrip(),
        "```",
        "",
        "| model | test MAE | params |",
        "|---|---:|---:|",
        f"| teacher ({t['key']}, the preset's) | {t['mae']:.3f} | {t['params']:,} |",
        f"| teacher ({o['key']}, {OTHER_EPOCHS} epochs) | {o['mae']:.3f} | {o['params']:,} |",
        f"| mean ensemble of both teachers | {e['mae']:.3f} | {e['params']:,} |",
        f"| student distilled from the ensemble | {_mean_sd(st['ensemble'])} | "
        f"{m['student_params']:,} |",
        f"| student distilled from the preset's teacher | {_mean_sd(st['single'])} | "
        f"{m['student_params']:,} |",
        f"| student, no distillation | {_mean_sd(st['scratch'])} | {m['student_params']:,} |",
        *(f"| {name.replace('_', ' ')} | {v:.3f} | – |" for name, v in m["baselines"].items()),
        "",
        f"Students: mean ± sd over seeds 0–{len(st['scratch']) - 1}; per seed (ensemble / single "
        "teacher / scratch): "
        + "; ".join(
            f"{a:.3f} / {b:.3f} / {c:.3f}"
            for a, b, c in zip(st["ensemble"], st["single"], st["scratch"], strict=True)
        )
        + ".",
        "",
    ]
    for label, key in (
        ("From the ensemble", "ensemble_kd"),
        ("From the preset's teacher", "single_kd"),
    ):
        entry = m[key]
        lines.append(
            f"- {label}: {entry['verdict']} (wins {entry['wins']} of {len(entry['seeds'])})."
        )
    wall = sum(c.wall_s for c in cmds)
    lines += ["", f"Commands run by this invocation: {len(cmds)}, {wall:.0f} s wall in all.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.ensemble_teacher", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dataset", default="los-loop", choices=sorted(DATASETS))
    p.add_argument("--seeds", type=int, default=3, help="student seeds, >= 2 (default 3)")
    p.add_argument("--storage", type=Path, default=DEFAULT_STORAGE, help="storage root")
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    p.add_argument("--prefix", default="ens", help="prefix of the run names (default ens)")
    p.add_argument("--teacher-run", help="run name of the preset's teacher (to reuse one)")
    p.add_argument("--other-run", help="run name of the other family's teacher (to reuse one)")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be >= 2")
    if not args.data.is_dir():
        print(
            f"bench.ensemble_teacher: no shared data folder at {args.data}; skipped",
            file=sys.stderr,
        )
        return 0
    storage = args.storage.absolute()
    storage.mkdir(parents=True, exist_ok=True)
    runs, cmds = train_all(
        args.dataset,
        storage,
        args.data.absolute(),
        args.seeds,
        args.prefix,
        storage / "ensemble.log",
        (args.teacher_run, args.other_run),
    )
    text = section(args.dataset, measure(args.dataset, storage, runs, args.seeds), cmds, argv)
    publish(HEADING.format(dataset=args.dataset), text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
