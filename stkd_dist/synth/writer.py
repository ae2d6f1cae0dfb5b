"""Writing synthetic datasets as canonical stores, block by block through Dask.

The data is a Dask array with one task per generated block (see :mod:`stkd_dist.synth.generator`);
:func:`stkd_dist.storage.write_store` rechunks it to the store's chunks and writes it chunk by chunk,
so memory is bounded by a few blocks however many steps are generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
from dask.base import tokenize
from dask.callbacks import Callback

from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.location import Location, PathInput, exists, location, url
from stkd_dist.storage import StoreMeta, choose_chunks, write_store
from stkd_dist.storage.store import DatasetStore
from stkd_dist.synth.generator import TrafficModel
from stkd_dist.synth.spec import CHANNEL_UNITS, SynthSpec

#: Root attribute holding the spec a synthetic store was made from.
SYNTH_ATTR = "synth"
_BLOCK_KEY = "synth-block"

#: ``on_block(done, total)`` is called after each generated block.
BlockCallback = Callable[[int, int], None]


def _generate_block(model: TrafficModel, k: int) -> np.ndarray:
    return model.block(k)


def synthetic_array(model: TrafficModel) -> da.Array:
    """The dataset of ``model`` as a lazy float32 ``[time, node, channel]`` array (NaN = missing).

    Chunks along time are the generator's blocks; nothing is computed until the array is stored.
    """
    spec = model.spec
    token = tokenize(model)
    # one graph key for the model, so that a distributed scheduler ships it once, not per block
    shared = dask.delayed(model, name=f"synth-model-{token}")
    blocks = []
    for k in range(model.n_blocks):
        t0, t1 = model.block_bounds(k)
        task = dask.delayed(_generate_block, pure=True)(
            shared, k, dask_key_name=f"{_BLOCK_KEY}-{token}-{k}"
        )
        blocks.append(
            da.from_delayed(task, shape=(t1 - t0, spec.nodes, len(spec.channels)), dtype=np.float32)
        )
    return da.concatenate(blocks, axis=0)


def store_chunks(spec: SynthSpec, chunk_steps: int | None) -> tuple[int, int, int]:
    """Chunk shape of the store: ``choose_chunks``, with ``chunk_steps`` steps when given."""
    steps, nodes, channels = choose_chunks(spec.steps, spec.nodes, len(spec.channels))
    if chunk_steps is not None:
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise ConfigError(
                f"must be a positive integer, got {chunk_steps!r}", where="--chunk-steps"
            )
        steps = min(chunk_steps, spec.steps)
    return steps, nodes, channels


def synthesize(
    spec: SynthSpec,
    dest: PathInput | Location,
    *,
    name: str | None = None,
    overwrite: bool = False,
    chunk_steps: int | None = None,
    on_block: BlockCallback | None = None,
) -> Location:
    """Generate the dataset of ``spec`` and write it atomically as a canonical store at ``dest``.

    Args:
        spec: what to generate.
        dest: the ``.zarr`` directory to create.
        name: dataset name recorded in the store (default: the directory's stem).
        overwrite: replace an existing store (only once the new one is complete).
        chunk_steps: steps per store chunk (default: about 4 MiB chunks). The data does not
            depend on it.
        on_block: progress callback ``(done, total)`` per generated block (threaded scheduler).
    """
    dest = location(dest)
    chunks = store_chunks(spec, chunk_steps)
    if not overwrite and exists(dest):
        # fail before generating anything
        raise StoreError("destination exists (pass --overwrite to replace it)", where=url(dest))
    model = TrafficModel(spec)
    values = synthetic_array(model)
    meta = StoreMeta(
        name=name or dest.name.removesuffix(".zarr"),
        time=spec.time,
        node_ids=[f"S{i:0{len(str(spec.nodes - 1))}d}" for i in range(spec.nodes)],
        channels=list(spec.channels),
        freq=pd.tseries.frequencies.to_offset(spec.freq).freqstr,
        adjacency=model.graph.adjacency,
        provenance=(
            f"synthetic road network from stkd synth (generator v{spec.generator_version}, "
            f"seed {spec.seed}); not measured data"
        ),
        locations=model.graph.locations(),
        extra_attrs={
            SYNTH_ATTR: spec.to_json(),
            "units": {c: CHANNEL_UNITS[c] for c in spec.channels},
        },
    )
    with _BlockProgress(model.n_blocks, on_block):
        return write_store(
            dest, values, ~da.isnan(values), meta, overwrite=overwrite, chunks=chunks
        )


def ensure_synthetic(
    spec: SynthSpec,
    dest: PathInput | Location,
    *,
    name: str | None = None,
    chunk_steps: int | None = None,
    on_block: BlockCallback | None = None,
) -> tuple[Location, bool]:
    """Reuse the store at ``dest`` when it was made from ``spec``, else (re)generate it.

    Returns ``(path, created)``. A damaged store or one made from another spec is replaced; a
    store that ``stkd synth`` did not make is never touched (:class:`StoreError`).
    """
    dest = location(dest)
    if exists(dest):
        try:
            store = DatasetStore(dest)
            store.verify_chunks()  # a full check: regenerating is cheap next to training on it
            attrs = store.attrs
        except StoreError:
            attrs = None  # damaged: regenerate it
        if attrs is not None:
            made_from = attrs.get(SYNTH_ATTR)
            if made_from is None:
                raise StoreError(
                    "a dataset that stkd synth did not make is in the way; use it with --data "
                    "or move it",
                    where=url(dest),
                )
            if made_from == spec.to_json():
                return dest, False
    path = synthesize(
        spec, dest, name=name, overwrite=True, chunk_steps=chunk_steps, on_block=on_block
    )
    return path, True


class _BlockProgress(Callback):
    """Counts finished generator tasks on Dask's local schedulers and reports them."""

    def __init__(self, total: int, on_block: BlockCallback | None) -> None:
        super().__init__()
        self.total = total
        self.done = 0
        self.on_block = on_block

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        # graph optimisation may fuse a block task into its consumer and rename the key, but the
        # fused name keeps ours
        name = key[0] if isinstance(key, tuple) else key
        if self.on_block is not None and isinstance(name, str) and _BLOCK_KEY in name:
            self.done += 1
            self.on_block(self.done, self.total)
