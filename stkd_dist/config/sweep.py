"""Config section ``sweep``: the search space and budget of ``stkd sweep``.

The search space maps dotted config keys to one distribution each::

    sweep:
      samples: 8
      max_epochs: 6
      space:
        distill.alpha: {uniform: [0.2, 0.9]}
        student.optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        student.model: {choice: [mlp, linear]}
        student.kwargs.embed_dim: {choice: [16, 32, 64]}

Distributions (the names of Ray Tune's sampling functions): ``uniform: [lo, hi]``,
``quniform: [lo, hi, q]``, ``loguniform: [lo, hi]`` (``0 < lo``), ``randint: [lo, hi]`` (integers,
``hi`` excluded), ``lograndint: [lo, hi]``, ``choice: [v1, v2, ...]`` and ``grid: [v1, ...]``
(every value, each repeated ``samples`` times).

Only the student's and the distillation settings can be swept (``student.*``, ``distill.*``,
``data.batch_size``): every trial shares one teacher and one soft-label cache, which a change of
the data window, the splits or the teacher would invalidate. This module checks the space's
structure and each value against the key's type; :func:`stkd_dist.pipeline.tune_space.check_space`
then checks every bound and choice against the whole config (value ranges, model arguments).

Schedulers (``sweep.scheduler``): ``asha`` stops unpromising trials at its rungs
(``grace_period``, ``reduction_factor``); ``pbt`` (Population Based Training) lets the worst
trials continue from the best ones' checkpoints every ``perturbation_interval`` epochs, with the
swept settings mutated. Each scheduler's keys are errors with the other one; left out (null) they
take the defaults of :data:`SCHEDULER_KEYS`. PBT never mutates the student's architecture
(``student.model``, ``student.kwargs.*``): a trial continuing from another's weights keeps that
trial's architecture, which those weights belong to.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stkd_dist.config.base import convert_value, resolve_key, suggestion, type_name
from stkd_dist.config.sections import non_negative, positive, require
from stkd_dist.errors import ConfigError

Scheduler = Literal["asha", "pbt"]
TrialLabels = Literal["stream", "cache"]
#: the keys only one scheduler takes, with their defaults (used when a key is null)
SCHEDULER_KEYS: dict[str, dict[str, int]] = {
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "pbt": {"perturbation_interval": 2},
}
MODEL_KEY = "student.model"
KWARGS_PREFIX = "student.kwargs."

Distribution = Literal[
    "uniform", "quniform", "loguniform", "randint", "lograndint", "choice", "grid"
]
DISTRIBUTIONS: tuple[str, ...] = typing.get_args(Distribution)
#: distributions that draw real numbers (not allowed for integer and string keys)
REAL = frozenset({"uniform", "quniform", "loguniform"})
#: distributions that draw integers
INTEGER = frozenset({"randint", "lograndint"})
#: distributions that list their values
LISTED = frozenset({"choice", "grid"})
#: config keys a sweep may change: the prefixes ending in "." and the exact keys
SWEEPABLE = ("student.", "distill.", "data.batch_size")

_USAGE = {
    "uniform": "[low, high]",
    "quniform": "[low, high, q]",
    "loguniform": "[low, high] with 0 < low",
    "randint": "[low, high] (integers, high excluded)",
    "lograndint": "[low, high] (integers, 0 < low, high excluded)",
    "choice": "[value, ...]",
    "grid": "[value, ...]",
}


@dataclass(frozen=True)
class ParamSpec:
    """One swept key and its distribution.

    Attributes:
        key: dotted config key (``student.optim.lr``).
        distribution: one of :data:`DISTRIBUTIONS`.
        args: the distribution's arguments (bounds, or the listed values).
    """

    key: str
    distribution: str
    args: tuple[Any, ...]

    @property
    def candidates(self) -> tuple[Any, ...]:
        """Values that bound what a trial can draw: the listed values, or the range's ends.

        Checking each against the config catches an out-of-range draw before any trial runs
        (``randint``'s upper bound is excluded, so its largest draw is ``high - 1``).
        """
        if self.distribution in LISTED:
            return self.args
        lo, hi = self.args[0], self.args[1]
        if self.distribution in INTEGER:
            return (lo, hi - 1)
        return (lo, hi)

    def describe(self) -> str:
        """``loguniform(0.0001, 0.01)``: for messages and the summary."""
        return f"{self.distribution}({', '.join(repr(a) for a in self.args)})"


def is_architecture_key(key: str) -> bool:
    """Whether swept key ``key`` shapes the student's weights (PBT never mutates such keys)."""
    return key == MODEL_KEY or key.startswith(KWARGS_PREFIX) or key == KWARGS_PREFIX[:-1]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_number(v: Any) -> Any:
    """YAML 1.1 reads exponents without a dot (``1e-4``) as strings: take them as numbers."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def check_sweepable(key: str, where: str) -> None:
    """Refuse keys outside :data:`SWEEPABLE` (they would invalidate the shared teacher labels)."""
    ok = any(key.startswith(p) if p.endswith(".") else key == p for p in SWEEPABLE)
    if not ok:
        raise ConfigError(
            f"{key!r} cannot be swept: every trial shares one teacher and its soft labels, so only "
            "student.*, distill.* and data.batch_size may vary",
            where=where,
        )


def _parse_args(key: str, name: str, raw: Any, where: str) -> tuple[Any, ...]:
    """Check the argument list of distribution ``name`` and return it as a tuple."""
    usage = f"{name} takes {_USAGE[name]}"
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"{usage}, got {raw!r}", where=where)
    args = tuple(raw)
    if name in LISTED:
        if not args:
            raise ConfigError(f"{usage}: list at least one value", where=where)
        unhashable = [a for a in args if isinstance(a, dict | list)]
        if unhashable:
            raise ConfigError(f"{usage}: values must be scalars, got {unhashable[0]!r}", where)
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{usage}: a value is listed twice in {list(args)}", where=where)
        return args
    want = 3 if name == "quniform" else 2
    args = tuple(_as_number(a) for a in args)
    if len(args) != want or not all(_is_number(a) for a in args):
        raise ConfigError(f"{usage}, got {list(args)}", where=where)
    if name in INTEGER and not all(_is_int(a) for a in args):
        raise ConfigError(f"{usage}: the bounds must be integers, got {list(args)}", where=where)
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{usage}: need low < high, got {list(args)}", where=where)
    if name in ("loguniform", "lograndint") and lo <= 0:
        raise ConfigError(f"{usage}: low must be > 0 for a log scale, got {lo!r}", where=where)
    if name == "quniform" and not args[2] > 0:
        raise ConfigError(f"{usage}: q must be > 0, got {args[2]!r}", where=where)
    return args


def _check_type(spec: ParamSpec, schema: type, where: str) -> None:
    """Check the drawn values fit the key's type (e.g. no real numbers for an integer field)."""
    tp = resolve_key(schema, spec.key, source=None)
    if tp is Any:  # free-form model kwargs: the model itself checks (see check_space)
        return
    base = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    tps = [t for t in base if t is not type(None)] or [tp]
    if spec.distribution in REAL and float not in tps:
        raise ConfigError(
            f"{spec.distribution} draws real numbers but {spec.key} is {type_name(tp)}; "
            f"use {'randint, lograndint, ' if int in tps else ''}choice or grid",
            where=where,
        )
    if spec.distribution in INTEGER and not ({int, float} & set(tps)):
        raise ConfigError(
            f"{spec.distribution} draws integers but {spec.key} is {type_name(tp)}; use choice "
            "or grid",
            where=where,
        )
    for value in spec.candidates:
        convert_value(value, tp, where)


def parse_space(
    space: Mapping[str, Any], where: str = "space", schema: type | None = None
) -> tuple[ParamSpec, ...]:
    """Parse a ``sweep.space`` mapping into :class:`ParamSpec` s (in the mapping's order).

    Args:
        space: dotted config key -> ``{distribution: arguments}``.
        where: the config key of ``space`` (errors name ``<where>.<key>``).
        schema: the configuration class the keys belong to (``Config``, which validates its
            own ``sweep.space`` with it); None checks the distributions only.

    Raises :class:`ConfigError` at ``<where>.<key>`` for an unknown config key (with a
    suggestion), a key that may not be swept, an unknown distribution, malformed arguments, or
    values that do not fit the key's type.
    """
    specs = []
    for key, entry in space.items():
        at = f"{where}.{key}"
        if not isinstance(key, str) or not key:
            raise ConfigError("keys must be dotted config keys like distill.alpha", where=at)
        if schema is not None:
            try:
                resolve_key(schema, key, source=None)  # unknown key: error with a suggestion
            except ConfigError as e:
                raise ConfigError(e.message, where=at) from None
        check_sweepable(key, at)
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise ConfigError(
                "expected one distribution, e.g. {uniform: [0.2, 0.9]} or {choice: [16, 32]}, "
                f"got {entry!r}",
                where=at,
            )
        ((name, raw),) = entry.items()
        if name not in DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {name!r}{suggestion(str(name), DISTRIBUTIONS)}; "
                f"known: {', '.join(DISTRIBUTIONS)}",
                where=at,
            )
        spec = ParamSpec(key, name, _parse_args(key, name, raw, at))
        if schema is not None:
            _check_type(spec, schema, at)
        specs.append(spec)
    keys = [s.key for s in specs]
    for k in keys:
        # "student.kwargs" and "student.kwargs.hidden" would overwrite each other
        nested = [o for o in keys if o.startswith(k + ".")]
        if nested:
            raise ConfigError(f"{k!r} and {nested[0]!r} overlap", where=f"{where}.{k}")
    return tuple(specs)


@dataclass(frozen=True)
class SweepSection:
    """``sweep``: what ``stkd sweep`` varies and how much it spends.

    Attributes:
        space: dotted config key -> ``{distribution: arguments}`` (see the module docstring).
        samples: trials drawn from the space (with ``grid`` keys: repetitions of the grid).
        max_epochs: epochs of a trial that is never stopped early (its ``student.schedule.epochs``).
        scheduler: ``asha`` (stops unpromising trials) or ``pbt`` (the worst trials continue
            from the best ones' checkpoints with mutated settings).
        grace_period: ASHA: epochs every trial runs before it may be stopped (null = 1).
        reduction_factor: ASHA: about ``1/reduction_factor`` of the trials reaching a rung
            continue to the next one (null = 2).
        perturbation_interval: PBT: epochs between a trial's perturbations (null = 2).
        keep_best: checkpoints each trial keeps, the best by validation MAE (ASHA; PBT keeps
            every checkpoint, since a trial may still continue from any other trial's latest).
        max_failures: times a crashed trial is restarted from its latest checkpoint (-1:
            without limit); a trial that fails more often is recorded as failed, the others go on.
        trial_workers: data-parallel workers of each trial. 1: the trial trains in its own Tune
            actor; N > 1: each trial is a Ray Train run of N DDP workers, placed by Ray Train
            wherever the cluster has room.
        cpus_per_worker: CPUs reserved for each worker of a trial (and its torch threads).
        gpus_per_worker: GPUs per worker (fractions share a GPU); 0 trains on CPU.
        max_concurrent: trials running at once; null = as many as the cluster's resources
            admit at each moment (Tune starts a pending trial when its CPUs and GPUs are free,
            so an autoscaling cluster that adds nodes runs more).
        labels: where the trials' soft labels come from. ``stream`` (default): the sweep
            starts ``serve.replicas`` teacher replicas (Ray actors) and the trials' workers
            stream their labels from them; the replicas write every window they compute through
            to the run's label cache and serve it from there afterwards, so workers on any node
            need no shared filesystem and the teacher computes each distinct window once,
            however many trials read it. ``cache``: the labels of every training window are
            computed into the label cache first (the ``labels`` stage) and the trials read it.
        label_replicas: teacher replicas the sweep starts for ``labels: stream`` (with the
            ``serve`` section's batching, compute, CPUs and security; ``serve.replicas`` and
            ``serve.replicas_per_node`` size ``distill``'s replicas). 1 (default): the teacher
            computes every distinct window exactly once, since the concurrent trials' requests
            for a window meet in its one batcher; more replicas spread the streams, but two of
            them may both compute a window that two trials ask for at the same moment.
        ensemble_size: the best trials averaged into the sweep's ``ensemble`` (``k``).
        top: trials shown in the final table.
    """

    space: dict[str, Any] = field(default_factory=dict)
    samples: int = 8
    max_epochs: int = 10
    scheduler: Scheduler = "asha"
    grace_period: int | None = None
    reduction_factor: int | None = None
    perturbation_interval: int | None = None
    keep_best: int = 2
    max_failures: int = 2
    trial_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None
    labels: TrialLabels = "stream"
    label_replicas: int = 1
    ensemble_size: int = 3
    top: int = 10

    def __post_init__(self) -> None:
        positive(self, "samples", "max_epochs", "keep_best", "cpus_per_worker", "trial_workers")
        positive(self, "top", "ensemble_size", "label_replicas")
        non_negative(self, "gpus_per_worker")
        require(
            self.max_failures >= -1,
            "max_failures",
            f"must be >= 0, or -1 for unlimited, got {self.max_failures!r}",
        )
        require(
            self.max_concurrent is None or self.max_concurrent > 0,
            "max_concurrent",
            f"must be > 0 or null, got {self.max_concurrent!r}",
        )
        for owner, keys in SCHEDULER_KEYS.items():
            for name in keys:
                require(
                    owner == self.scheduler or getattr(self, name) is None,
                    name,
                    f"is a setting of sweep.scheduler {owner!r}, but sweep.scheduler is "
                    f"{self.scheduler!r}; remove it (or set sweep.scheduler: {owner})",
                )
        # the distributions; keys and types are checked by the whole ``Config``, which knows them
        specs = parse_space(self.space)
        settings = self.scheduler_settings
        if self.scheduler == "asha":
            self._check_asha(settings)
        else:
            self._check_pbt(settings, specs)

    def _check_asha(self, settings: dict[str, int]) -> None:
        grace, factor = settings["grace_period"], settings["reduction_factor"]
        require(grace > 0, "grace_period", f"must be > 0, got {grace!r}")
        require(
            grace <= self.max_epochs,
            "grace_period",
            f"must be <= max_epochs ({self.max_epochs}), got {grace}",
        )
        require(factor >= 2, "reduction_factor", f"must be >= 2, got {factor}")

    def _check_pbt(self, settings: dict[str, int], specs: tuple[ParamSpec, ...]) -> None:
        interval = settings["perturbation_interval"]
        require(interval > 0, "perturbation_interval", f"must be > 0, got {interval!r}")
        require(
            interval < self.max_epochs,
            "perturbation_interval",
            f"must be < max_epochs ({self.max_epochs}) for any trial to be perturbed, "
            f"got {interval}",
        )
        require(
            self.samples >= 2,
            "samples",
            f"PBT needs a population: at least 2 trials, got {self.samples}",
        )
        require(
            not specs or any(not is_architecture_key(s.key) for s in specs),
            "space",
            "PBT mutates the swept settings of running trials, but every key here shapes the "
            f"student's weights ({MODEL_KEY}, {KWARGS_PREFIX}*), which PBT never mutates; "
            "also sweep e.g. distill.alpha or student.optim.lr",
        )

    @property
    def scheduler_settings(self) -> dict[str, int]:
        """The settings of ``scheduler``, defaults filled in (``{"grace_period": 1, ...}``)."""
        defaults = SCHEDULER_KEYS[self.scheduler]
        return {
            k: default if getattr(self, k) is None else getattr(self, k)
            for k, default in defaults.items()
        }

    def params(self) -> tuple[ParamSpec, ...]:
        """The parsed search space (keys and types checked when the ``Config`` was built)."""
        return parse_space(self.space, "sweep.space")
