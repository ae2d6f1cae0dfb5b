"""Layout of the soft-label cache: its objects, attributes, stored dtypes, codecs and chunks.

One Zarr v3 group per teacher version and dataset (a local folder or an object-store prefix
such as ``s3://bucket/labels/…``)::

    <cache>/                              group attributes: schema, teacher, dataset, settings
      <split>/prediction                  [windows of split, H, N, C_out], ``chunk_rows`` windows
      <split>/spread                      per chunk, compressed (teachers with spread only)
      <split>/hidden                      [windows of split, N, F], chunked like prediction
                                          (caches created with hidden states only)
      _stkd/commit.json                   written last when the cache is created
      _stkd/done/<split>/<chunk>          one per chunk whose rows are all written
      _stkd/rows/<split>/<chunk>/<id>.npz rows of a chunk not yet complete (write-through)
      _stkd/forward/<writer>.json         windows the teacher ran on, one object per writer

(what the objects under ``_stkd`` vouch for, and how writers share them:
:mod:`stkd_dist.serving.cache_markers`).

Row ``i`` of a split holds window ``split_start + i * stride``. Root attributes record the schema
version, the dataset fingerprint, the teacher version and its validation MAE (``val_mae``), the
label shape, the codec and ``label_dtype`` (``float32``, the default, keeps labels bitwise equal to
a live forward pass; ``float16`` and ``bfloat16`` halve the bytes; reads always return float32),
``hidden_dim`` (F of the stored hidden states; 0 or absent, as in caches made before hidden states
existed: none), each split's window range and chunk rows, and the compute settings the labels
were made with
(``micro_batch``, ``precision``, ``label_device``: the device type; see
:mod:`stkd_dist.serving.forward`): labels of other settings differ in their last bits, so a server
writing through to a cache must compute with the cache's settings. Caches written before these
were recorded read as :data:`LEGACY_COMPUTE`.

Chunks follow the shard plan (:mod:`stkd_dist.data.plan`): ranks read chunk-aligned blocks of
contiguous windows, shuffled only within a block, so the chunk rows are chosen
(:func:`plan_chunk_rows`) such that the chunks overlapping the plan's blocks hold at most
:data:`DESIGN_AMPLIFICATION` times the rows of the blocks, for world sizes up to
``max(PLAN_WORLD_SIZES)`` (a reader fetches each chunk of a block once:
:mod:`stkd_dist.serving.cache_reader`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import zarr
from upath import UPath

from stkd_dist.data.plan import make_blocks
from stkd_dist.errors import StoreError
from stkd_dist.location import PathInput, location
from stkd_dist.paths import storage_root
from stkd_dist.serving.teacher import safe_version

log = logging.getLogger("stkd_dist.serving.cache")

CACHE_SCHEMA_ATTR = "stkd_label_cache_version"
CACHE_SCHEMA_VERSION = 2
COMMIT_MARKER = "_stkd/commit.json"
META_DIR = "_stkd"
# Rows per chunk: at most about this many bytes of float32 labels per chunk object, and at
# least this many (below it the cost of an object, a request, outweighs what it saves in reads).
TARGET_CHUNK_BYTES = 4 * 2**20
MIN_CHUNK_BYTES = 4 * 2**10
# kept for callers of schema 1; the ``filled`` flags are gone (see the cache_markers module)
FILLED_CHUNK = 65536
# world sizes the chunk rows are chosen for (plan_chunk_rows), and the amplification allowed
PLAN_WORLD_SIZES = (1, 2, 4, 8)
DESIGN_AMPLIFICATION = 1.25

# compute settings of caches that predate recording them: every fill then ran fp32 CPU
# micro-batches of 32 windows
LEGACY_COMPUTE: dict[str, Any] = {"micro_batch": 32, "precision": "fp32", "label_device": "cpu"}

LABEL_DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("blosc-zstd", "zstd", "none")
DEFAULT_CODEC = "blosc-zstd"
DEFAULT_LABEL_DTYPE = "float32"
_BF16_NAN = np.uint16(0x7FC0)


def output_names(has_spread: bool, hidden_dim: int) -> tuple[str, ...]:
    """The arrays of each split of a cache, in :data:`~.label_arrays.OUTPUT_NAMES` order."""
    return (
        "prediction",
        *(("spread",) if has_spread else ()),
        *(("hidden",) if hidden_dim else ()),
    )


def output_shape(name: str, window_shape: tuple[int, ...], hidden_dim: int) -> tuple[int, ...]:
    """The shape of one window's row of array ``name``: ``[H, N, C]``, or ``[N, F]`` (hidden)."""
    return (int(window_shape[1]), int(hidden_dim)) if name == "hidden" else tuple(window_shape)


def default_cache_path(fingerprint: str, version: str, storage: PathInput | None = None) -> UPath:
    """``<storage>/labels/<fingerprint>/<teacher version>.zarr``."""
    root = location(storage_root(storage))
    return root / "labels" / fingerprint / f"{safe_version(version)}.zarr"


# -- stored dtypes and codecs ------------------------------------------------------------------
def _stored_dtype(label_dtype: str) -> np.dtype:
    """The numpy dtype of the Zarr arrays: bfloat16 is kept as its 16 bits (Zarr has no bf16)."""
    return np.dtype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[label_dtype]
    )


def _fill_value(label_dtype: str) -> Any:
    return int(_BF16_NAN) if label_dtype == "bfloat16" else np.nan


def encode_labels(values: np.ndarray, label_dtype: str) -> np.ndarray:
    """Float32 labels as stored: unchanged, float16, or bfloat16 bits (round to nearest even)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if label_dtype == "float32":
        return v
    if label_dtype == "float16":
        return v.astype(np.float16)
    bits = v.view(np.uint32).astype(np.uint64)  # 64 bits: the rounding carry must not wrap
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(v), _BF16_NAN, rounded)


def decode_labels(stored: np.ndarray, label_dtype: str) -> np.ndarray:
    """Stored labels back to float32 (a copy unless they are float32 already)."""
    if label_dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored, dtype=np.float32)


def _compressors(codec: str) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return (ZstdCodec(level=3),)
    if codec == "blosc-zstd":
        # byte shuffle first: the high bytes of neighbouring floats compress, the low ones not
        return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}", where="codec")


def _check_setting(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise StoreError(
            f"unknown {what} {value!r}; choose one of {', '.join(allowed)}", where=what
        )
    return value


# -- chunking ----------------------------------------------------------------------------------
def rows_per_chunk(window_shape: tuple[int, ...], n_rows: int) -> int:
    """Rows of a chunk by size alone: about :data:`TARGET_CHUNK_BYTES` each, at most ``n_rows``."""
    row_bytes = int(np.prod(window_shape)) * 4
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // max(row_bytes, 1)))


def _block_rows(windows: range, chunk_steps: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first row, rows)`` of each block of the shard plan for ``world`` ranks."""
    blocks = make_blocks(windows, chunk_steps, 4 * world)
    first = np.array([(b.start - windows.start) // windows.step for b in blocks], dtype=np.int64)
    return first, np.array([len(b) for b in blocks], dtype=np.int64)


def chunk_amplification(first: np.ndarray, rows: np.ndarray, chunk_rows: int, n_rows: int) -> float:
    """Rows of the chunks overlapping each block, summed, per row of the blocks.

    This is the read amplification of a reader that fetches each chunk of a block once.
    """
    lo = first // chunk_rows
    hi = (first + rows - 1) // chunk_rows + 1
    fetched = np.minimum(hi * chunk_rows, n_rows) - lo * chunk_rows
    return float(fetched.sum() / max(int(rows.sum()), 1))


def plan_chunk_rows(
    windows: range,
    chunk_steps: int,
    row_bytes: int,
    *,
    target_bytes: int = TARGET_CHUNK_BYTES,
    min_bytes: int = MIN_CHUNK_BYTES,
    world_sizes: Iterable[int] = PLAN_WORLD_SIZES,
    max_amplification: float = DESIGN_AMPLIFICATION,
) -> int:
    """Chunk rows for ``windows`` read through shard plans of a store chunked ``chunk_steps``.

    The largest number of rows (between ``min_bytes`` and ``target_bytes`` of float32 labels)
    for which the chunks overlapping every plan block hold at most ``max_amplification`` times
    the block's rows, for each world size in ``world_sizes``; when no size reaches that (tiny
    splits), the size with the least amplification. Sizes that divide the store chunks' block
    boundaries (no chunk straddles two such blocks) are among the candidates.
    """
    n = len(windows)
    cap = max(1, min(n, target_bytes // max(row_bytes, 1)))
    floor = max(1, min(cap, -(-min_bytes // max(row_bytes, 1))))
    layouts = [_block_rows(windows, chunk_steps, w) for w in world_sizes if n >= w]
    if not layouts:
        return cap
    # the boundaries every plan shares: the store chunks' (sub-blocks add their own)
    starts = np.unique(np.concatenate([f for f, _ in layouts]))
    g = int(np.gcd.reduce(starts[starts > 0])) if (starts > 0).any() else 0
    candidates = {cap, floor}
    if g:
        candidates.update(d for d in _divisors(g) if floor <= d <= cap)
    r = float(cap)
    while r >= floor:  # a geometric ladder down from the cap: few candidates, none far from best
        candidates.add(int(r))
        r *= 0.95
    worst = {
        rows: max(chunk_amplification(f, c, rows, n) for f, c in layouts)
        for rows in candidates
        if rows >= floor
    }
    fits = [rows for rows, amp in worst.items() if amp <= max_amplification]
    if fits:
        return max(fits)
    return min(worst, key=lambda rows: (worst[rows], -rows))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _range_attr(r: range, chunk_rows: int, block_rows: int) -> dict[str, int]:
    return {
        "start": r.start,
        "stop": r.stop,
        "step": r.step,
        "windows": len(r),
        "chunk_rows": chunk_rows,
        "block_rows": block_rows,
    }


# -- a split's arrays --------------------------------------------------------------------------
def _create_split(
    group: zarr.Group,
    window_shape: tuple[int, ...],
    has_spread: bool,
    split: str,
    windows: range,
    codec: str,
    label_dtype: str,
    chunk_steps: int | None,
    hidden_dim: int = 0,
) -> None:
    """The empty arrays of ``split`` and its entry in the group's attributes.

    Every array has the same chunk rows, chosen by the prediction's row size alone: a cache with
    hidden states is chunked like one without.
    """
    n = len(windows)
    if n == 0:
        return
    row_bytes = int(np.prod(window_shape)) * 4
    if chunk_steps:
        rows = plan_chunk_rows(windows, int(chunk_steps), row_bytes)
        block = max(int(_block_rows(windows, int(chunk_steps), 1)[1].max()), rows)
    else:
        rows = rows_per_chunk(window_shape, n)
        block = rows
    sub = group.require_group(split)
    for name in output_names(has_spread, hidden_dim):
        row = output_shape(name, window_shape, hidden_dim)
        sub.create_array(
            name,
            shape=(n, *row),
            chunks=(rows, *row),
            dtype=_stored_dtype(label_dtype),
            fill_value=_fill_value(label_dtype),
            compressors=_compressors(codec),
            dimension_names=(
                ("window", "node", "feature")
                if name == "hidden"
                else ("window", "horizon", "node", "channel")
            ),
            # a chunk equal to the fill value must still be stored: its marker vouches for it
            config={"write_empty_chunks": True},
        )
    splits: dict[str, Any] = dict(cast(Mapping[str, Any], group.attrs.get("splits", {})))
    splits[split] = _range_attr(windows, rows, block)
    group.attrs["splits"] = splits


# -- compute settings --------------------------------------------------------------------------
def compute_attrs(micro_batch: int, precision: str, label_device: str) -> dict[str, Any]:
    """The root attributes recording how a cache's labels are computed (device type only)."""
    return {
        "micro_batch": int(micro_batch),
        "precision": str(precision),
        "label_device": str(label_device).split(":", 1)[0],
    }


def stored_compute(attrs: dict[str, Any]) -> dict[str, Any]:
    """``micro_batch``, ``precision`` and ``label_device`` of a cache (:data:`LEGACY_COMPUTE`
    for the settings a cache written before they were recorded lacks)."""
    return {k: type(v)(attrs.get(k, v)) for k, v in LEGACY_COMPUTE.items()}


def check_compute(
    cached: dict[str, Any], computed: dict[str, Any], writable: bool, where: str
) -> None:
    """Compare the cache's compute settings with a server's (both as :func:`compute_attrs`).

    A writable (write-through) cache with other settings is refused: it would mix labels that
    differ in their last bits. A read-only one is served with a warning (its labels are the
    teacher's, computed another way).

    Raises:
        StoreError: naming both settings, for a writable cache.
    """
    if cached == computed:
        return

    def text(s: dict[str, Any]) -> str:
        return f"micro_batch {s['micro_batch']}, {s['precision']} on {s['label_device']}"

    message = (
        f"the cache's labels were computed with {text(cached)}, this teacher computes with "
        f"{text(computed)}"
    )
    if writable:
        raise StoreError(
            f"{message}: writing through would mix labels that differ in their last bits; serve "
            "with the cache's settings (--micro-batch, --precision, --device) or use another cache",
            where=where,
        )
    log.warning("%s: %s; its labels are served as they are", where, message)
