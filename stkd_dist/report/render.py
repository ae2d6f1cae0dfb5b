"""Render ``report.md`` and a self-contained ``report.html`` (PNGs embedded) for a run."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import pandas as pd

from stkd_dist.report import plots
from stkd_dist.report.inputs import ReportInputs, label, load_inputs


def summary_table(inp: ReportInputs) -> pd.DataFrame:
    """One row per model/baseline: MAE, RMSE, MAPE, params, latency and speed-up vs teacher."""
    teacher_latency = inp.metrics.get("teacher", {}).get("latency_ms")
    rows = []
    for name in inp.models:
        m = inp.metrics[name]
        latency = m.get("latency_ms")
        speedup = teacher_latency / latency if teacher_latency and latency else None
        rows.append(
            {
                "model": label(name),
                "MAE": m.get("mae"),
                "RMSE": m.get("rmse"),
                "MAPE %": m.get("mape"),
                "params": m.get("params"),
                "latency ms": latency,
                "speed-up": speedup,
            }
        )
    return pd.DataFrame(rows)


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


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` into ``run_dir``; return both paths.

    Files are written under temporary names and renamed, so a reader never sees half a report.
    """
    inp = load_inputs(run_dir)
    run_dir = inp.run_dir
    fig_dir = run_dir / "report"
    fig_dir.mkdir(exist_ok=True)
    figures = _figures(inp, fig_dir)
    table = summary_table(inp)
    ds = inp.dataset
    title = f"stkd-dist report: {run_dir.name}"
    intro = (
        f"Dataset **{ds.get('name', '?')}** ({ds.get('nodes', '?')} nodes, {ds.get('steps', '?')} steps, "
        f"fingerprint `{ds.get('fingerprint', '?')}`). Test-split metrics in original units; "
        "latency is the CPU time of one forward pass on the same batch for every model."
    )

    md = [f"# {title}", "", intro, "", "## Models and baselines", "", markdown_table(table), ""]
    for caption, path in figures:
        md += [f"## {caption}", "", f"![{caption}](report/{path.name})", ""]
    if inp.leaderboard is not None:
        md += ["## Sweep leaderboard", "", markdown_table(inp.leaderboard.head(20)), ""]

    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro).replace('**', '')}</p>",
        "<h2>Models and baselines</h2>",
        table.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", border=0),
    ]
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        body += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">',
        ]
    if inp.leaderboard is not None:
        body += [
            "<h2>Sweep leaderboard</h2>",
            inp.leaderboard.head(20).to_html(index=False, border=0),
        ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}"
        "img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _atomic_write(md_path, "\n".join(md))
    _atomic_write(html_path, page)
    return md_path, html_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
