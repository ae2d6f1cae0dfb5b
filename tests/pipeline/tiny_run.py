"""The config of a tiny ``stkd distill`` run for the end-to-end tests: one worker, a label cache,
a one-block Graph WaveNet teacher and an MLP student, two epochs each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_STGNN = {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 16,
              "end_channels": 16, "blocks": 1}  # fmt: skip


def tiny_run_config(
    path: Path, store: Path | None = None, teacher_model: str = "stgnn", **sections: Any
) -> Path:
    """Write the tiny config to ``path`` (``store`` as ``data.dataset`` when given); each keyword
    is a section whose keys are set on top of it (``distill={"rounds": 2}``)."""
    cfg: dict[str, Any] = {
        "run": {"seed": 0},
        "data": {"horizon": 6, "batch_size": 16, "eval_batch_size": 64},
        "teacher": {
            "model": teacher_model,
            "kwargs": TINY_STGNN,
            "schedule": {"epochs": 2, "warmup_epochs": 1},
        },
        "student": {
            "model": "mlp",
            "kwargs": {"embed_dim": 8, "node_dim": 4, "tod_dim": 4, "dow_dim": 4, "num_layers": 1},
            "schedule": {"epochs": 2, "warmup_epochs": 1},
        },
        "serve": {"mode": "cache"},
        "evaluate": {"latency_batch_size": 16, "latency_repeats": 2, "forecast_sensors": 2},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
    }
    if store is not None:
        cfg["data"]["dataset"] = str(store)
    for name, keys in sections.items():
        cfg[name] = {**cfg.get(name, {}), **keys}
    path.write_text(yaml.safe_dump(cfg))
    return path
