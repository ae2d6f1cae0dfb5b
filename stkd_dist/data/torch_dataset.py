"""A ``torch.utils.data.IterableDataset`` over a rank loader.

The dataset yields whole :class:`WindowBatch` es (batching happens in the shard plan), so use it as
``DataLoader(dataset, batch_size=None, num_workers=0)``. Worker processes are refused: each would
replay the whole shard, and forking after zarr started its I/O thread is unsafe (see
:mod:`stkd_dist.data.loader`); the loader already prefetches in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from torch.utils.data import IterableDataset, get_worker_info

from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.loader import RankLoader, make_loader
from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import ConfigError


class WindowIterableDataset(IterableDataset[WindowBatch]):
    """Batches of one rank for the current epoch; call :meth:`set_epoch` before each epoch.

    Args:
        loader_factory: ``epoch -> RankLoader``, e.g. from :meth:`for_split`.
        epoch: the first epoch.
    """

    def __init__(self, loader_factory: Callable[[int], RankLoader], epoch: int = 0) -> None:
        super().__init__()
        if not callable(loader_factory):
            raise ConfigError("loader_factory must be callable: epoch -> RankLoader")
        self.loader_factory = loader_factory
        self.epoch = int(epoch)
        self._loader: RankLoader | None = None

    @classmethod
    def for_split(
        cls,
        reader: WindowReader,
        split: str,
        world_size: int = 1,
        rank: int = 0,
        *,
        seed: int = 0,
        batch_size: int = 32,
        shuffle: bool | None = None,
        epoch: int = 0,
    ) -> WindowIterableDataset:
        """The dataset of ``rank``'s part of ``split`` (arguments as :func:`make_loader`)."""
        factory = partial(
            _loader_for_epoch,
            reader,
            split,
            world_size,
            rank,
            seed=seed,
            batch_size=batch_size,
            shuffle=shuffle,
        )
        return cls(factory, epoch=epoch)

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch`` (a new shuffle; every rank must switch to the same epoch)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._loader = None

    @property
    def loader(self) -> RankLoader:
        """The rank loader of the current epoch."""
        if self._loader is None:
            self._loader = self.loader_factory(self.epoch)
        return self._loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[WindowBatch]:
        info = get_worker_info()
        if info is not None:
            raise ConfigError(
                "use DataLoader(..., batch_size=None, num_workers=0): the rank loader batches "
                "and prefetches itself, and worker processes would repeat the shard",
                where="num_workers",
            )
        return iter(self.loader)


def _loader_for_epoch(
    reader: WindowReader,
    split: str,
    world_size: int,
    rank: int,
    epoch: int,
    *,
    seed: int,
    batch_size: int,
    shuffle: bool | None,
) -> RankLoader:
    return make_loader(
        reader,
        split,
        world_size,
        rank,
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        shuffle=shuffle,
    )
