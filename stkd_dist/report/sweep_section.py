"""The report's sweep section: the leaderboard with its aggregates, and what the scheduler did.

It reads what ``stkd sweep`` left in the run (:func:`stkd_dist.report.inputs.read_sweep`):
``sweep/leaderboard.csv`` (trials best first, then the ``soup`` and ``ensemble`` rows) and
``sweep/summary.json`` (stop reasons, the scheduler's decisions, the aggregates' comparison with
the best trial).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from stkd_dist.report.inputs import ReportInputs

#: trials shown in the report's leaderboard (the aggregates are always shown)
TOP_TRIALS = 20


def sweep_board(inp: ReportInputs) -> pd.DataFrame | None:
    """The best :data:`TOP_TRIALS` trials, then the aggregate rows; None without a sweep."""
    trials = inp.trials
    if trials is None:
        return None
    aggregates = inp.aggregates
    parts = [trials.head(TOP_TRIALS)]
    if aggregates is not None and not aggregates.empty:
        parts.append(aggregates)
    return pd.concat(parts, ignore_index=True)


def sweep_notes(inp: ReportInputs) -> list[str]:
    """Plain sentences: how the aggregates compare with the best trial, why trials stopped, and
    the scheduler's decisions (ASHA's stopped trials, PBT's exploits)."""
    summary = inp.sweep or {}
    notes = [*_aggregate_notes(summary.get("aggregates") or {})]
    reasons = summary.get("stop_reasons")
    if reasons:
        notes.append(
            "Trials by stop reason: "
            + ", ".join(f"{reason} {count}" for reason, count in reasons.items())
            + "."
        )
    notes += _scheduler_notes(summary.get("scheduler") or {})
    return notes


def _aggregate_notes(aggregates: dict[str, Any]) -> list[str]:
    best = aggregates.get("best") or {}
    if "test_mae" not in best:
        return []
    out = []
    for name, what in (("soup", "The greedy weight soup"), ("ensemble", "The top-k ensemble")):
        agg = aggregates.get(name)
        if not agg:
            continue
        members = agg.get("members") or []
        verdict = "beats" if agg.get("beats_best") else "does not beat"
        out.append(
            f"{what} ({len(members)} member(s): {', '.join(map(str, members))}) has test MAE "
            f"{agg['test_mae']:.3f} and {verdict} the best single trial "
            f"({best['trial']}, {best['test_mae']:.3f})."
        )
    return out


def _scheduler_notes(scheduler: dict[str, Any]) -> list[str]:
    name = scheduler.get("name")
    if name == "asha":
        stopped = scheduler.get("stopped") or []
        if not stopped:
            return ["ASHA stopped no trial."]
        return [f"ASHA stopped {len(stopped)} trial(s) at a rung: {', '.join(stopped)}."]
    if name == "pbt":
        exploits = scheduler.get("exploits") or []
        if not exploits:
            return ["PBT made no exploit."]
        lines = [
            f"PBT: trial {e.get('trial')} continued from trial {e.get('donor')}'s checkpoint "
            f"after epoch {e.get('epoch')}."
            for e in exploits
        ]
        return lines
    return []
