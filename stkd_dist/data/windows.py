"""Windows and time splits.

A sample is a window starting at step ``t``: input steps ``[t, t+L)`` and target steps
``[t+L, t+L+H)``. A window is identified by its start step ``t`` (its *window index*), which is
unique across splits. Splits cut the time axis into train / val / test by fraction; a window belongs
to the split that contains all of its ``L+H`` steps, so no window straddles two splits.
"""

from __future__ import annotations

from dataclasses import dataclass

from stkd_dist.errors import InputError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WindowSpec:
    """Input length ``L``, horizon ``H`` and stride between consecutive windows (in steps)."""

    input_steps: int = 12
    horizon: int = 12
    stride: int = 1

    def __post_init__(self) -> None:
        for field_name in ("input_steps", "horizon", "stride"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"must be a positive integer, got {value!r}", where=field_name)

    @property
    def length(self) -> int:
        """Steps one window spans: ``L + H``."""
        return self.input_steps + self.horizon


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of the time axis for train / val / test (in that order along time)."""

    train: float = 0.7
    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        for name in SPLITS:
            frac = getattr(self, name)
            if not 0.0 <= frac <= 1.0:
                raise InputError(f"must be between 0 and 1, got {frac!r}", where=f"split.{name}")
        if self.train <= 0:
            raise InputError("the training split must be non-empty", where="split.train")
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise InputError(
                f"train + val + test must sum to 1, got {self.train + self.val + self.test:g}",
                where="split",
            )

    def step_ranges(self, steps: int) -> dict[str, tuple[int, int]]:
        """``{split: (first_step, end_step)}`` covering ``[0, steps)`` without overlap."""
        n_train = round(steps * self.train)
        n_val = round(steps * self.val)
        return {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, steps),
        }


def check_split_name(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise InputError(
            f"unknown split {split!r}; choose one of {', '.join(SPLITS)}", where="--split"
        )
    return split


def split_windows(steps: int, window: WindowSpec, splits: SplitSpec, split: str) -> range:
    """Window indices (start steps) of ``split`` for a series of ``steps`` steps.

    Raises :class:`InputError` when the series is shorter than one window or the split is too short
    to hold any window.
    """
    check_split_name(split)
    if steps < window.length:
        raise InputError(
            f"the series has {steps} steps, shorter than one window of L+H = {window.length}",
            where="window",
        )
    lo, hi = splits.step_ranges(steps)[split]
    last_start = hi - window.length
    if last_start < lo:
        raise InputError(
            f"split {split!r} spans {hi - lo} steps, fewer than one window of L+H = "
            f"{window.length}; use a longer series, a shorter window or a larger {split} fraction",
            where=f"split.{split}",
        )
    return range(lo, last_start + 1, window.stride)
