"""Render ``report.md`` and a self-contained ``report.html`` (PNGs embedded) for a run.

The report opens with a verdict: the headline table (integers as integers, the best learned model
marked), one sentence on whether the distilled student beat the scratch student and the naive
baselines, a flag when the teacher does not beat the baselines on validation, and, for runs with
several seeds, the distilled-vs-scratch statistics in plain words.
"""

from __future__ import annotations

import base64
import html
import itertools
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from stkd_dist.location import (
    Location,
    PathInput,
    exists,
    location,
    read_json,
    scratch_dir,
    write_bytes_atomic,
    write_text_atomic,
)
from stkd_dist.report import plots
from stkd_dist.report.inputs import ReportInputs, _npz, label, load_inputs, read_sweep
from stkd_dist.report.sweep_section import sweep_board, sweep_notes

#: ``metrics.json`` entries that are findings of the run, not models (see
#: :mod:`stkd_dist.pipeline.findings`)
FINDINGS = ("headroom", "kd_vs_scratch", "labels", "rounds", "teacher_check", "weekday_check")
LEARNED = ("teacher", "student_kd", "student_scratch")
BASELINES = ("last_value", "historical_average")


def load_report(run_dir: PathInput | Location) -> tuple[ReportInputs, dict[str, Any]]:
    """The run's report inputs and its findings (``kd_vs_scratch``, ``teacher_check``)."""
    run_dir = location(run_dir)
    path = run_dir / "metrics.json"
    raw = read_json(path) if exists(path) else {}
    findings = {k: raw.pop(k) for k in FINDINGS if isinstance(raw, dict) and k in raw}
    if not findings:
        return load_inputs(run_dir), {}
    # load_inputs takes every entry of metrics.json for a model; build the inputs from the rest
    dataset = raw.pop("dataset", {})
    for name, entry in raw.items():
        if not isinstance(entry, dict) or "mae" not in entry:
            from stkd_dist.errors import InputError

            raise InputError(f"entry {name!r} must be an object with at least 'mae'", str(path))
    history = read_json(run_dir / "history.json") if exists(run_dir / "history.json") else {}
    leaderboard, sweep = read_sweep(run_dir)
    inp = ReportInputs(
        run_dir,
        raw,
        dataset,
        history,
        _npz(run_dir / "forecasts.npz"),
        _npz(run_dir / "locations.npz"),
        leaderboard,
        sweep,
    )
    return inp, findings


def best_learned(inp: ReportInputs) -> str | None:
    """The learned model (teacher or a student) with the lowest test MAE."""
    learned = [
        m for m in inp.models if m not in BASELINES and inp.metrics[m].get("mae") is not None
    ]
    return min(learned, key=lambda m: inp.metrics[m]["mae"]) if learned else None


def summary_table(inp: ReportInputs) -> pd.DataFrame:
    """One row per model/baseline: MAE, RMSE, MAPE, params, latency and speed-up vs teacher.

    ``best`` marks the best learned model with a ``★``; ``params`` stay integers (object column).
    """
    teacher_latency = inp.metrics.get("teacher", {}).get("latency_ms")
    best = best_learned(inp)
    rows = []
    for name in inp.models:
        m = inp.metrics[name]
        latency = m.get("latency_ms")
        speedup = teacher_latency / latency if teacher_latency and latency else None
        params = m.get("params")
        rows.append(
            {
                "model": label(name),
                "best": "★" if name == best else "",
                "MAE": m.get("mae"),
                "RMSE": m.get("rmse"),
                "MAPE %": m.get("mape"),
                "params": None if params is None else int(params),
                "latency ms": latency,
                "speed-up": speedup,
            }
        )
    counts = [row.pop("params") for row in rows]
    df = pd.DataFrame(rows)
    # inserted as an object column: with a missing count pandas would make every count a float
    df.insert(5, "params", pd.Series(counts, dtype=object))
    return df


def headline_verdict(inp: ReportInputs) -> str:
    """One sentence: did the distilled student beat the scratch student and the baselines?"""
    m = inp.metrics
    if "student_kd" not in m:
        return ""
    kd = m["student_kd"]["mae"]
    parts = []
    if "student_scratch" in m:
        sc = m["student_scratch"]["mae"]
        word = "beat" if kd < sc else "did not beat"
        parts.append(f"{word} the student trained without distillation ({sc:.3f})")
    base = {b: m[b]["mae"] for b in BASELINES if b in m}
    if base:
        beaten = [label(b) for b, v in base.items() if kd < v]
        if len(beaten) == len(base):
            parts.append("beat both naive baselines" if len(base) > 1 else f"beat {beaten[0]}")
        elif beaten:
            lost = [f"{label(b)} ({v:.3f})" for b, v in base.items() if kd >= v]
            parts.append(f"beat {', '.join(beaten)} but not {', '.join(lost)}")
        else:
            lost = [f"{label(b)} ({v:.3f})" for b, v in base.items()]
            parts.append(f"did not beat {' or '.join(lost)}")
    if not parts:
        return ""
    text = f"The distilled student (test MAE {kd:.3f}) " + parts[0]
    for prev, part in itertools.pairwise(parts):
        # "and" between two wins or two losses, "but" between a win and a loss
        text += (
            " and " if prev.startswith("did not") == part.startswith("did not") else " but "
        ) + part
    if "teacher" in m:
        ratio = kd / m["teacher"]["mae"]
        if ratio >= 1:
            text += f"; its test MAE is {100 * (ratio - 1):.1f} % above the teacher's"
        else:
            text += f"; its test MAE is {100 * (1 - ratio):.1f} % below the teacher's"
    return text + "."


def finding_lines(findings: dict[str, Any]) -> list[str]:
    """Plain-words lines of the run's findings (teacher check, headroom, distilled vs scratch)."""
    lines = []
    check = findings.get("teacher_check")
    if check is not None and not check.get("beats_baselines", True):
        lines.append(f"**Teacher check:** {check['message']}.")
    headroom = findings.get("headroom")
    if headroom is not None and not headroom.get("worth_distilling", True):
        lines.append(f"**Headroom:** {headroom['message']}.")
    weekdays = findings.get("weekday_check")
    if weekdays is not None:
        lines.append(f"**Weekday check:** {weekdays['message']}.")
    entry = findings.get("kd_vs_scratch")
    if entry is not None:
        text = entry.get("verdict", "")
        text = text[:1].upper() + text[1:]
        ci = entry.get("ci95")
        if ci is not None:
            text += (
                f" (mean difference distilled − scratch {entry['mean_difference']:+.3f}, "
                f"bootstrap 95 % interval [{ci[0]:+.3f}, {ci[1]:+.3f}])"
            )
        lines.append(f"**Distilled vs scratch over seeds:** {text}.")
    rounds = findings.get("rounds")
    if rounds is not None:
        text = rounds["verdict"]
        lines.append(f"**Distillation rounds:** {text[:1].upper() + text[1:]}.")
    cost = findings.get("labels")
    if cost is not None:
        computed, distinct = cost["teacher_windows_computed"], cost["distinct_windows"]
        lines.append(
            f"**Soft labels** ({cost['mode']}): the teacher computed {computed:,} windows for "
            f"{distinct:,} distinct windows ({computed / max(distinct, 1):.2f} per window)."
        )
    return lines


def seeds_table(entry: dict[str, Any]) -> pd.DataFrame:
    """Per-seed test MAE of the distilled and the scratch student."""
    return pd.DataFrame(
        {
            "seed": [int(s) for s in entry["seeds"]],
            "distilled MAE": entry["kd"]["mae"],
            "scratch MAE": entry["scratch"]["mae"],
        }
    ).astype({"seed": object})


def rounds_table(entry: dict[str, Any]) -> pd.DataFrame:
    """Per round of ``distill.rounds``: the teacher's and the student's validation / test MAE."""
    rows = entry["rounds"]
    return pd.DataFrame(
        {
            "round": [int(r["round"]) for r in rows],
            "teacher val MAE": [r["teacher_val_mae"] for r in rows],
            "teacher test MAE": [r["teacher_test_mae"] for r in rows],
            "student val MAE": [r["student_val_mae"] for r in rows],
            "student test MAE": [r["student_test_mae"] for r in rows],
        }
    ).astype({"round": object})


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def html_table(df: pd.DataFrame) -> str:
    """The same cells as :func:`markdown_table`, as an HTML table."""
    return df.map(_fmt).to_html(index=False, border=0, escape=True)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _figures(inp: ReportInputs, out: Path) -> list[tuple[str, Path]]:
    candidates = [
        ("Error by forecast horizon", plots.horizon_curves(inp, out)),
        ("Learning curves", plots.learning_curves(inp, out)),
        ("Forecasts vs truth", plots.forecast_panels(inp, out)),
        ("Per-sensor error map", plots.error_map(inp, out)),
        ("Sweep: size vs accuracy", plots.pareto(inp, out)),
    ]
    return [(title, path) for title, path in candidates if path is not None]


def write_report(run_dir: PathInput | Location) -> tuple[Location, Location]:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` into ``run_dir``; return both paths.

    Figures are drawn in a local scratch folder (matplotlib writes local files) and uploaded;
    every file is written atomically, so a reader never sees half a report.
    """
    inp, findings = load_report(run_dir)
    run_dir = inp.run_dir
    scratch = scratch_dir("report")
    try:
        return _write_report(inp, run_dir, scratch, findings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_report(
    inp: ReportInputs, run_dir: Location, scratch: Path, findings: dict[str, Any] | None = None
) -> tuple[Location, Location]:
    findings = findings or {}
    figures = _figures(inp, scratch)
    for _, path in figures:
        write_bytes_atomic(run_dir / "report" / path.name, path.read_bytes())
    table = summary_table(inp)
    ds = inp.dataset
    title = f"stkd-dist report: {run_dir.name}"
    intro = (
        f"Dataset **{ds.get('name', '?')}** ({ds.get('nodes', '?')} nodes, {ds.get('steps', '?')} steps, "
        f"fingerprint `{ds.get('fingerprint', '?')}`). Test-split metrics in original units; "
        "latency is the CPU time of one forward pass on the same batch for every model."
    )

    verdict = headline_verdict(inp)
    notes = finding_lines(findings)
    md = [f"# {title}", "", intro, "", "## Models and baselines", "", markdown_table(table), ""]
    md += ["★ = the best learned model (lowest test MAE).", ""]
    if verdict:
        md += [verdict, ""]
    for line in notes:
        md += [line, ""]
    if "kd_vs_scratch" in findings:
        md += ["## Distilled vs scratch student, per seed", ""]
        md += [markdown_table(seeds_table(findings["kd_vs_scratch"])), ""]
    if "rounds" in findings:
        md += ["## Distillation rounds", ""]
        md += [markdown_table(rounds_table(findings["rounds"])), ""]
    for caption, path in figures:
        md += [f"## {caption}", "", f"![{caption}](report/{path.name})", ""]
    board = sweep_board(inp)
    if board is not None:
        md += ["## Sweep leaderboard", "", markdown_table(board), ""]
        md += [*(f"- {line}" for line in sweep_notes(inp)), ""]

    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro).replace('**', '')}</p>",
        "<h2>Models and baselines</h2>",
        html_table(table),
        "<p>★ = the best learned model (lowest test MAE).</p>",
    ]
    for line in ([verdict] if verdict else []) + notes:
        text = html.escape(line)
        while "**" in text:  # **bold** of the markdown lines
            text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
        body.append(f"<p>{text}</p>")
    if "kd_vs_scratch" in findings:
        body += [
            "<h2>Distilled vs scratch student, per seed</h2>",
            html_table(seeds_table(findings["kd_vs_scratch"])),
        ]
    if "rounds" in findings:
        body += ["<h2>Distillation rounds</h2>", html_table(rounds_table(findings["rounds"]))]
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        body += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">',
        ]
    if board is not None:
        body += [
            "<h2>Sweep leaderboard</h2>",
            board.to_html(index=False, border=0),
            "<ul>",
            *(f"<li>{html.escape(line)}</li>" for line in sweep_notes(inp)),
            "</ul>",
        ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}"
        "img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text_atomic(md_path, "\n".join(md))
    write_text_atomic(html_path, page)
    return md_path, html_path
