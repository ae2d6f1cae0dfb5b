"""The golden values written by ``tests/fixtures/make_golden.py`` (NumPy only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_losses.json"
BOOL_INPUTS = {"mask", "valid"}


@pytest.fixture(scope="session")
def golden() -> dict[str, Any]:
    """The golden file with its inputs as float64 (bool for masks) tensors."""
    data = json.loads(GOLDEN.read_text())
    data["x"] = {
        k: torch.tensor(v, dtype=torch.bool if k in BOOL_INPUTS else torch.float64)
        for k, v in data["inputs"].items()
    }
    return data
