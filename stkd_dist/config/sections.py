"""Config sections about the run, the data and the cluster.

Each section is a frozen dataclass; its annotations are the schema (see :mod:`.base`) and its
``__post_init__`` checks value ranges, raising :class:`ConfigError` whose ``where`` is the field
name (the loader prefixes the section and the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stkd_dist.data.windows import SplitSpec, WindowSpec
from stkd_dist.errors import ConfigError, StkdError


def require(ok: bool, where: str, message: str) -> None:
    """Raise :class:`ConfigError` at field ``where`` unless ``ok``."""
    if not ok:
        raise ConfigError(message, where=where)


def positive(obj: object, *names: str) -> None:
    """Require each named field of ``obj`` to be > 0."""
    for name in names:
        value = getattr(obj, name)
        require(value > 0, name, f"must be > 0, got {value!r}")


def non_negative(obj: object, *names: str) -> None:
    """Require each named field of ``obj`` to be >= 0."""
    for name in names:
        value = getattr(obj, name)
        require(value >= 0, name, f"must be >= 0, got {value!r}")


@dataclass(frozen=True)
class RunSection:
    """``run``: what the run is called and how it is seeded.

    Attributes:
        name: run name (directory under ``<storage>/runs``); null = the preset name or the config
            file's stem.
        seed: seeds model initialisation and the shuffling of every epoch.
        keep_best: how many checkpoints with the best validation MAE to keep (the latest one is
            always kept as well, to resume from).
        seeds: ``stkd distill`` trains the distilled and the scratch student with this many
            seeds (``seed``, ``seed + 1``, ...; one teacher) and compares them (``kd_vs_scratch``
            in ``metrics.json``).
    """

    name: str | None = None
    seed: int = 0
    keep_best: int = 2
    seeds: int = 1

    def __post_init__(self) -> None:
        positive(self, "keep_best", "seeds")
        non_negative(self, "seed")
        if self.name is not None:
            from stkd_dist.paths import check_name

            try:
                check_name(self.name, "run-name")
            except StkdError as e:
                raise ConfigError(e.message, where="name") from None


@dataclass(frozen=True)
class SplitSection:
    """``data.split``: fractions of the time axis (train, then val, then test)."""

    train: float = 0.7
    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        try:
            self.spec()
        except StkdError as e:
            # SplitSpec names "split.<field>" or "split" (the sum); here the section is the prefix
            field_name = (e.where or "").removeprefix("split").removeprefix(".")
            raise ConfigError(e.message, where=field_name) from None

    def spec(self) -> SplitSpec:
        """The data plane's :class:`SplitSpec`."""
        return SplitSpec(train=self.train, val=self.val, test=self.test)


@dataclass(frozen=True)
class DataSection:
    """``data``: which store, which windows and which channels.

    Attributes:
        dataset: a store path or a dataset name under the storage root.
        input_steps, horizon, stride: the window (L input steps, H forecast steps).
        split: train/val/test fractions.
        input_channels: channel names fed to the model (null = all channels).
        target_channels: channel names forecast (null = the input channels).
        per_node_stats: normalise each node with its own statistics instead of per channel.
        target_fraction: keep only this share of the training split's targets: the last
            ``round(fraction x hours)`` whole hours keep theirs, earlier training steps are not
            targets (a network with little history; inputs, statistics, validation and test
            are unchanged). 1 = all.
        recent_days: train on the windows of only the last N days of the training split
            (``stkd update``'s fine-tune on what arrived lately); statistics, validation and test
            are unchanged. null = every training window.
        batch_size: training windows per step and rank.
        eval_batch_size: windows per step when validating or evaluating.
    """

    dataset: str = "demo"
    input_steps: int = 12
    horizon: int = 12
    stride: int = 1
    split: SplitSection = field(default_factory=SplitSection)
    input_channels: tuple[str, ...] | None = None
    target_channels: tuple[str, ...] | None = None
    per_node_stats: bool = False
    target_fraction: float = 1.0
    recent_days: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        require(bool(self.dataset), "dataset", "must name a store path or a dataset")
        positive(self, "input_steps", "horizon", "stride", "batch_size", "eval_batch_size")
        require(
            0.0 < self.target_fraction <= 1.0,
            "target_fraction",
            f"must be in (0, 1] (the share of training targets kept), got {self.target_fraction}",
        )
        require(
            self.recent_days is None or self.recent_days >= 1,
            "recent_days",
            f"must be >= 1 day (or null for every training window), got {self.recent_days!r}",
        )
        for name in ("input_channels", "target_channels"):
            value = getattr(self, name)
            require(value is None or len(value) > 0, name, "must list channels or be null")
            if value is not None:
                dup = sorted({c for c in value if value.count(c) > 1})
                require(not dup, name, f"lists channel(s) twice: {', '.join(dup)}")

    def window(self) -> WindowSpec:
        """The data plane's :class:`WindowSpec`."""
        return WindowSpec(input_steps=self.input_steps, horizon=self.horizon, stride=self.stride)

    def splits(self) -> SplitSpec:
        """The data plane's :class:`SplitSpec`."""
        return self.split.spec()


@dataclass(frozen=True)
class WorkerRange:
    """``cluster.num_workers: {min: 2, max: 4}``: elastic training between two world sizes.

    Attributes:
        min: the fewest workers training continues on (fewer: it waits for resources).
        max: the most workers it starts, and grows back to, when the cluster has room.
    """

    min: int = 0
    max: int = 0

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            value = getattr(self, name)
            require(
                value > 0,
                name,
                f"must be > 0 (e.g. num_workers: {{min: 2, max: 4}}), got {value!r}",
            )
        require(self.min <= self.max, "min", f"must be <= max ({self.max}), got {self.min!r}")


@dataclass(frozen=True)
class ClusterSection:
    """``cluster``: where and how wide training runs.

    Attributes:
        num_workers: data-parallel training workers (DDP ranks): a number, or ``{min, max}`` for
            elastic training (Ray Train's elastic scaling: the worker group restarts on fewer
            workers when one is lost for good and grows back when resources return; the epoch
            in progress is re-dealt to the new world size from the latest checkpoint, so every
            window is still seen once per epoch).
        use_gpu: one GPU per worker and NCCL; otherwise CPU and gloo.
        cpus_per_worker: CPUs Ray reserves for each worker.
        torch_threads: intra-op threads of each worker (``torch.set_num_threads``).
        address: Ray cluster to connect to; null = ``$RAY_ADDRESS`` if set, else start a local one.
        max_failures: how many worker-group failures a run recovers from, each time from its
            latest (step or epoch) checkpoint; -1 = unlimited, 0 = none.
        resize_interval_s: elastic training: how often a running worker group checks whether
            the cluster has room for more workers (each resize restarts the group from the
            latest checkpoint, so checkpoint often: ``checkpoint.every_steps``).
    """

    num_workers: int | WorkerRange = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int = 1
    address: str | None = None
    max_failures: int = 3
    resize_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, int):
            positive(self, "num_workers")
        positive(self, "cpus_per_worker", "torch_threads", "resize_interval_s")
        require(
            self.max_failures >= -1,
            "max_failures",
            f"must be >= 0, or -1 for unlimited, got {self.max_failures!r}",
        )

    @property
    def elastic(self) -> bool:
        """Whether the world size may change during a run (``num_workers: {min, max}``)."""
        return isinstance(self.num_workers, WorkerRange)

    @property
    def max_workers(self) -> int:
        """The most workers the run uses (the number it starts with)."""
        n = self.num_workers
        return n.max if isinstance(n, WorkerRange) else n

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains on."""
        n = self.num_workers
        return n.min if isinstance(n, WorkerRange) else n

    def describe_workers(self) -> str:
        """``2`` or ``2-4 (elastic)``, for status lines."""
        if self.elastic:
            return f"{self.min_workers}-{self.max_workers} (elastic)"
        return str(self.max_workers)


@dataclass(frozen=True)
class CheckpointSection:
    """``checkpoint``: checkpoints inside an epoch, as well as the one at every epoch's end.

    A mid-epoch checkpoint holds everything needed to continue the epoch exactly where it
    stopped (model, optimiser, scheduler, early-stopping state, the step reached in the shard
    plan, every rank's partial epoch sums); the random state of a step is derived from
    ``(run.seed, rank, epoch, step)``, so it needs no saving. Resuming from it gives the same
    weights, bit for bit, as never having stopped (for the same world size; elastic training
    re-deals the rest of the epoch to a new one).
    Mid-epoch checkpoints rank below every epoch checkpoint when ``run.keep_best`` prunes, so
    the latest one is kept (to resume from) and older ones are deleted.

    Attributes:
        every_steps: also checkpoint after every this many optimiser steps of an epoch
            (0 = never).
        every_minutes: also checkpoint when this many minutes passed since the last checkpoint
            (rank 0's clock decides for all ranks; 0 = never).
        upload: ``async`` (default): rank 0 writes the checkpoint to a local temporary folder
            and training goes on while Ray Train uploads it to the run's storage in the
            background (it registers the checkpoint, and a resume can use it, only once the
            upload is complete); ``sync``: every rank waits for the upload.
    """

    every_steps: int = 0
    every_minutes: float = 0.0
    upload: Literal["async", "sync"] = "async"

    def __post_init__(self) -> None:
        non_negative(self, "every_steps", "every_minutes")

    @property
    def enabled(self) -> bool:
        """Whether any mid-epoch checkpoint is asked for."""
        return self.every_steps > 0 or self.every_minutes > 0


@dataclass(frozen=True)
class StorageSection:
    """``storage``: how to reach an object-store storage root (``STKD_STORAGE=s3://…``).

    Endpoint and credentials normally come from the standard variables the clients read
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, …); keep
    secrets there, not in a config file that is copied into every run directory.

    Attributes:
        options: fsspec options, flat (every protocol) or per protocol, e.g.
            ``{"s3": {"endpoint_url": "https://minio:9000", "client_kwargs": {"region_name":
            "eu-west-1"}}}``. They reach Ray workers and teacher replicas through their
            environment (``STKD_STORAGE_OPTIONS``), never a command line.
    """

    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.options.items():
            require(isinstance(key, str), "options", f"option names are strings, got {key!r}")
            if isinstance(value, dict):
                for inner in value:
                    require(isinstance(inner, str), f"options.{key}", "option names are strings")
