"""The report's figures, each written as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are rendered on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from stkd_dist.report.inputs import ReportInputs, label

DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # keep legends placed outside the axes
    plt.close(fig)
    return path


def horizon_curves(inp: ReportInputs, out: Path) -> Path | None:
    """MAE per horizon step for every model and baseline."""
    series: dict[str, list[float]] = {
        m: s for m in inp.models if (s := inp.metrics[m].get("mae_per_horizon"))
    }
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in series.items():
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, marker="o", markersize=3, label=label(name))
    ax.set_xlabel("horizon step")
    ax.set_ylabel("test MAE")
    ax.set_title("Error by forecast horizon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "horizon_mae.png")


def learning_curves(inp: ReportInputs, out: Path) -> Path | None:
    """Training loss and validation MAE per epoch of teacher and students."""
    if not inp.history:
        return None
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for name, rows in inp.history.items():
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(
            epochs, [r.get("train_loss", np.nan) for r in rows], marker=".", label=label(name)
        )
        ax_val.plot(epochs, [r.get("val_mae", np.nan) for r in rows], marker=".", label=label(name))
    ax_loss.set_title("Training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_val.set_title("Validation MAE")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("MAE")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "learning_curves.png")


def forecast_panels(inp: ReportInputs, out: Path) -> Path | None:
    """Forecasts vs truth for a few sensors over a day."""
    fc = inp.forecasts
    if fc is None or "truth" not in fc:
        return None
    truth = fc["truth"]  # [T, S]
    sensors = [str(s) for s in fc.get("node_ids", np.arange(truth.shape[1]))]
    x = fc["time"] if "time" in fc else np.arange(truth.shape[0])
    preds = {k.removeprefix("pred_"): v for k, v in fc.items() if k.startswith("pred_")}
    n = truth.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(8.0, 2.2 * n + 0.4), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(x, truth[:, i], color="black", linewidth=1.4, label="truth")
        for name, p in preds.items():
            ax.plot(x, p[:, i], linewidth=1.0, label=label(name))
        ax.set_ylabel(f"sensor {sensors[i]}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("Forecasts vs truth (last horizon step)")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("time")
    fig.autofmt_xdate()
    return _save(fig, out / "forecasts.png")


def error_map(inp: ReportInputs, out: Path, model: str = "student_kd") -> Path | None:
    """Per-sensor test MAE at the sensors' locations."""
    loc = inp.locations
    entry = inp.metrics.get(model) or inp.metrics.get("teacher")
    if loc is None or entry is None or not entry.get("mae_per_node"):
        return None
    mae = np.asarray(entry["mae_per_node"], dtype=float)
    if mae.shape[0] != loc["latitude"].shape[0]:
        return None
    # a degree of longitude is cos(latitude) as long as one of latitude: the figure's height
    # follows the sensors' extent so that the map keeps roughly its true shape
    stretch = 1.0 / max(np.cos(np.radians(float(np.mean(loc["latitude"])))), 0.1)
    lat_span, lon_span = np.ptp(loc["latitude"]), np.ptp(loc["longitude"])
    ratio = stretch * lat_span / lon_span if lon_span > 0 else 1.0
    fig, ax = plt.subplots(figsize=(6.4, float(np.clip(5.0 * ratio + 1.2, 3.0, 7.5))))
    sc = ax.scatter(
        loc["longitude"], loc["latitude"], c=mae, cmap="viridis", s=28, edgecolor="k", linewidth=0.3
    )
    fig.colorbar(sc, ax=ax, label="test MAE")
    # longitudes like -118.55 are long labels: few ticks, so they never run into each other
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(f"Per-sensor error: {label(model if model in inp.metrics else 'teacher')}")
    return _save(fig, out / "error_map.png")


def pareto(inp: ReportInputs, out: Path) -> Path | None:
    """Sweep trials: parameters vs test MAE, with the Pareto front of the trials and the
    ``soup`` and ``ensemble`` aggregates marked."""
    board = inp.trials
    if board is None or board.empty or not {"params", "test_mae"} <= set(board.columns):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(board["params"], board["test_mae"], alpha=0.7, label="trials")
    front = pareto_front(board["params"].to_numpy(), board["test_mae"].to_numpy())
    fb = board.iloc[front].sort_values("params")
    ax.plot(
        fb["params"],
        fb["test_mae"],
        color="crimson",
        marker="o",
        drawstyle="steps-post",
        label="Pareto front",
    )
    aggregates = inp.aggregates
    for _, row in (aggregates if aggregates is not None else board.iloc[:0]).iterrows():
        marker = "*" if row["kind"] == "soup" else "D"
        ax.scatter([row["params"]], [row["test_mae"]], marker=marker, s=120, label=row["kind"])
    if "teacher" in inp.metrics and inp.metrics["teacher"].get("params"):
        ax.axhline(inp.metrics["teacher"]["mae"], color="gray", linestyle="--", label="teacher MAE")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("test MAE")
    ax.set_title("Size / accuracy trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "pareto.png")


def pareto_front(params: np.ndarray, mae: np.ndarray) -> list[int]:
    """Indices of points not dominated by another (fewer-or-equal params and lower-or-equal MAE)."""
    keep = []
    for i in range(len(params)):
        dominated = np.any(
            (params <= params[i]) & (mae <= mae[i]) & ((params < params[i]) | (mae < mae[i]))
        )
        if not dominated:
            keep.append(i)
    return keep
