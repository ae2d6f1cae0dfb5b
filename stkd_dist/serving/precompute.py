"""Fill a label cache in one pass: ``stkd precompute-labels`` and the pipeline's cache stage.

The teacher runs over every window of the requested splits, whole cache chunks at a time, into a
cache written under a temporary name and renamed into place, so a crash or Ctrl-C leaves no
half-written cache where a reader would find it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stkd_dist.errors import StoreError
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.teacher import Teacher


def precompute_labels(
    teacher: Teacher,
    out: str | os.PathLike[str],
    splits: Sequence[str],
    *,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LabelCache:
    """Run ``teacher`` on every window of ``splits`` and store the labels at ``out``.

    The cache is written under a temporary name next to ``out`` and renamed into place when
    complete. Blocks of whole chunks are computed ``batch_size`` windows at a time.

    Args:
        progress: called with the number of windows done after each batch.

    Raises:
        StoreError: ``out`` exists and ``overwrite`` is False.
    """
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise StoreError(
            "a label cache exists there; pass --overwrite to replace it", where=str(dest)
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        cache = LabelCache.create(tmp, teacher.meta, splits)
        forward = 0
        for split in splits:
            windows = teacher.meta.splits[split]
            if len(windows) == 0:
                continue
            rows = cache.group[split]["prediction"].chunks[0]
            index = np.asarray(windows, dtype=np.int64)
            # whole chunks at a time: no chunk file is written twice
            for lo in range(0, len(index), rows):
                block = index[lo : lo + rows]
                preds, spreads = [], []
                for b in range(0, len(block), batch_size):
                    pred, spread = teacher.predict(block[b : b + batch_size])
                    preds.append(pred)
                    spreads.append(spread)
                    forward += len(pred)
                    if progress is not None:
                        progress(len(pred))
                spread_block = np.concatenate(spreads) if teacher.meta.has_spread else None
                cache.write(block, np.concatenate(preds), spread_block)
        cache.add_forward_windows(forward)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LabelCache(dest)
