"""The teachers of a distilled student: what names them, how they are checked, pinned, started.

* :class:`TeacherSpec`: one teacher, from ``--teacher`` (:func:`parse_teacher`: the endpoints of a
  teacher service's replicas, or ``ray:N`` replicas to start) or ``--labels``
  (:func:`parse_labels`: a label cache);
* :func:`label_client`: a client of a teacher service with the run's :class:`ClientOptions`;
* :class:`LabelSpec`: a student's teachers and how their labels combine (``distill.ensemble``);
* :func:`resolve_teachers`: the driver's one check of every teacher before training: the dataset
  fingerprint, the label shape and the training windows must be the student's; each teacher's
  version is pinned (so every worker and every failover uses the teacher that was checked) and its
  validation MAE read (``Describe`` or the cache) for ``inverse_error`` weights; a student
  distilling hidden states (``distill.loss: hint``) also needs a teacher that delivers them (a
  server reporting ``hidden_dim``, a cache made with them), whose width F is pinned too;
* started replicas (``ray:N`` teachers as Ray actors for the length of a run) are
  :mod:`stkd_dist.labels.started`.

The worker side (label sources) is :mod:`stkd_dist.labels.sources`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from stkd_dist.distill.ensemble import RULES, teacher_weights
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.location import url
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import ClientOptions, SoftLabelClient
from stkd_dist.serving.discovery import EndpointSource

TeacherKind = Literal["stream", "cache", "replicas"]
CACHE_SCHEME = "cache:"
RAY_SCHEME = "ray:"


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a student.

    Attributes:
        kind: ``stream`` (a teacher service), ``cache`` (a label cache) or ``replicas`` (start
            ``replicas`` teacher servers as Ray actors).
        location: the endpoint specification (``host:port,...``, ``dns:///``, ``ray:PREFIX``) or
            the cache path (empty for ``replicas``: :func:`started_replicas` gets the checkpoint).
        replicas: how many replicas to start (``replicas`` only).
        version: the teacher version, pinned once checked (empty before).
        val_mae: the teacher's validation MAE, when known.
        client: this teacher's client options when they are its own (started replicas: the
            run's generated token and CA); None = the student's (:attr:`LabelSpec.client`).
        hidden_dim: F of the teacher's hidden states ``[N, F]``, pinned once checked for a
            student that distils them (0: not checked, or not delivered).
    """

    kind: TeacherKind
    location: str = ""
    replicas: int = 0
    version: str = ""
    val_mae: float | None = None
    client: ClientOptions | None = field(default=None, repr=False)  # carries a token
    hidden_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("stream", "cache", "replicas"):
            raise ConfigError(f"unknown teacher kind {self.kind!r}", where="teacher")
        if self.kind == "replicas" and self.replicas < 1:
            raise ConfigError(f"must start at least 1 replica, got {self.replicas}", "--teacher")
        if self.kind != "replicas" and not self.location:
            raise ConfigError(f"a {self.kind} teacher needs a location", where="teacher")

    @property
    def name(self) -> str:
        """How the teacher is named in messages and delivery records."""
        if self.kind == "cache":
            return f"{CACHE_SCHEME}{self.location}"
        if self.kind == "replicas":
            return f"{RAY_SCHEME}{self.replicas}"
        return self.location


def parse_teacher(text: str) -> TeacherSpec:
    """A ``--teacher`` value: endpoints of one teacher's replicas, or ``ray:N`` replicas to start.

    Raises:
        ConfigError: a malformed endpoint specification.
    """
    spec = text.strip()
    rest = spec.removeprefix(RAY_SCHEME)
    if spec.startswith(RAY_SCHEME) and rest.isdigit():
        return TeacherSpec("replicas", replicas=int(rest))
    try:
        EndpointSource(spec)  # validates HOST:PORT lists, dns:/// and ray:PREFIX
    except ConfigError as e:
        raise ConfigError(f"{e.message} (in {text!r})", where="--teacher") from None
    return TeacherSpec("stream", spec)


def parse_labels(text: str) -> TeacherSpec:
    """A ``--labels`` value: ``cache:PATH`` of a label cache (``stkd precompute-labels``)."""
    spec = text.strip()
    if not spec.startswith(CACHE_SCHEME) or not spec.removeprefix(CACHE_SCHEME):
        raise ConfigError(
            f"expected cache:PATH (a label cache from `stkd precompute-labels`), got {text!r}",
            where="--labels",
        )
    return TeacherSpec("cache", url(spec.removeprefix(CACHE_SCHEME)))


def label_client(
    options: ClientOptions, endpoints: str, fingerprint: str, version: str | None
) -> SoftLabelClient:
    """A client of the teacher service at ``endpoints`` for labels of dataset ``fingerprint``."""
    return SoftLabelClient(
        endpoints,
        expected_fingerprint=fingerprint,
        expected_version=version or None,
        options=options,
    )


@dataclass(frozen=True)
class LabelSpec:
    """The soft labels of a distilled student: its teachers and how they are combined.

    Attributes:
        teachers: one or more teachers (resolved: ``stream`` or ``cache``, versions pinned).
        fingerprint: the dataset fingerprint every teacher must serve.
        ensemble: ``mean`` or ``inverse_error`` (needs every teacher's ``val_mae``).
        spread: also fetch the teachers' spread (log-variance; for confidence weighting).
        hidden: also fetch the teacher's hidden states (``distill.loss: hint``; one teacher).
        split: the split whose windows are distilled.
        client: options of the teacher-service clients.
        in_memory: read each ``cache`` teacher's split whole into memory once per worker
            (instead of reading each batch's rows from the cache).
        wait_meter: the named Ray actor each rank reports its label wait to (started replicas
            with ``serve.autoscale``; None = none).
    """

    teachers: tuple[TeacherSpec, ...]
    fingerprint: str
    ensemble: str = "mean"
    spread: bool = False
    split: str = "train"
    client: ClientOptions = field(default_factory=ClientOptions)
    hidden: bool = False
    in_memory: bool = False
    wait_meter: str | None = None

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError(
                "a distilled student needs a teacher (--teacher or --labels)", "--teacher"
            )
        if self.ensemble not in RULES:
            raise ConfigError(f"must be one of {', '.join(RULES)}", where="distill.ensemble")
        if self.hidden and len(self.teachers) > 1:
            # each teacher's hidden states live in a space of their own: there is no mean of them
            raise ConfigError(
                f"the hint loss distils one teacher's hidden states, {len(self.teachers)} "
                "teachers are named; name one, or use another loss",
                where="distill.loss",
            )

    @property
    def hidden_dim(self) -> int:
        """F of the (one) teacher's hidden states, as pinned by :func:`resolve_teachers`."""
        return self.teachers[0].hidden_dim if self.hidden else 0

    @property
    def val_errors(self) -> list[float] | None:
        """Each teacher's validation MAE (for ``inverse_error``; None with ``mean``)."""
        if self.ensemble == "mean":
            return None
        missing = [t.name for t in self.teachers if not t.val_mae]
        if missing:
            raise ConfigError(
                f"inverse_error needs each teacher's validation MAE; unknown for {', '.join(missing)}"
                " (use distill.ensemble=mean)",
                where="distill.ensemble",
            )
        return [float(t.val_mae) for t in self.teachers]  # type: ignore[arg-type]

    def weights(self) -> list[float]:
        """The normalised weight of each teacher in the ensemble."""
        return teacher_weights(len(self.teachers), self.ensemble, self.val_errors)


def hint_cache_message() -> str:
    """Why a label cache without hidden states cannot teach a ``hint`` student, and what to do."""
    return (
        "distill.loss: hint needs the teacher's hidden states, and this label cache holds none "
        "(it was made without them): recompute it with `stkd precompute-labels --hidden "
        "--overwrite`, or stream the labels from the teacher (serve.mode: stream, or --teacher)"
    )


def check_cache_hidden(teachers: Sequence[TeacherSpec]) -> None:
    """Refuse label caches without hidden states for a ``hint`` student (cheap: opens them).

    Raises:
        StoreError: a ``cache`` teacher made without hidden states (:func:`hint_cache_message`).
    """
    for t in teachers:
        if t.kind == "cache" and not LabelCache(t.location).hidden_dim:
            raise StoreError(hint_cache_message(), where=t.name)


# -- driver side: check the teachers once --------------------------------------------------------
def _check_labels(
    name: str,
    shape: tuple[int, ...],
    windows: range | None,
    has_spread: bool,
    *,
    window_shape: tuple[int, int, int],
    train: range,
    spread: bool,
    split: str,
) -> None:
    if tuple(shape) != tuple(window_shape):
        raise ConfigError(
            f"its labels are {list(shape)} per window [H, N, C_out], the student predicts "
            f"{list(window_shape)}: the teacher was trained with another horizon, node set or "
            "target channels",
            where=name,
        )
    if windows != train:
        raise ConfigError(
            f"its {split} split covers windows {windows}, the student's covers {train}: the "
            "teacher was trained with other window (input_steps, horizon, stride) or split settings",
            where=name,
        )
    if spread and not has_spread:
        raise ConfigError(
            "distill.confidence_weighting needs the teacher's spread, and this teacher has none "
            "(a teacher built with spread=True has)",
            where=name,
        )


def resolve_teachers(
    teachers: Sequence[TeacherSpec],
    *,
    fingerprint: str,
    window_shape: tuple[int, int, int],
    windows: range,
    spread: bool = False,
    split: str = "train",
    client: ClientOptions | None = None,
    hidden: bool = False,
) -> tuple[TeacherSpec, ...]:
    """Check each ``stream``/``cache`` teacher against the student; pin versions, read MAEs.

    A teacher service is asked ``Describe`` (the client refuses another dataset fingerprint); a
    cache is opened and must hold every window of ``split``.

    Args:
        teachers: the teachers (``replicas`` must have been started and turned into ``stream``).
        fingerprint: the student's dataset fingerprint.
        window_shape: ``(H, N, C_out)`` the student predicts.
        windows: the student's windows of ``split``.
        spread: the student needs the teachers' spread.
        hidden: the student needs the teachers' hidden states (``distill.loss: hint``): a
            teacher service must report ``hidden_dim``, a cache must hold them; F is pinned.

    Raises:
        ConfigError / StoreError / LabelMismatchError / TeacherUnavailableError: a teacher that
        does not fit, or cannot be reached.
    """
    client = client or ClientOptions()
    out = []
    for t in teachers:
        common: dict[str, Any] = {
            "window_shape": window_shape,
            "train": windows,
            "spread": spread,
            "split": split,
        }
        if t.kind == "stream":
            with label_client(t.client or client, t.location, fingerprint, t.version) as c:
                info = c.describe()
            found = {s.split: range(s.start, s.stop, s.step) for s in info.splits}
            _check_labels(
                t.name, tuple(info.window_shape), found.get(split), info.has_spread, **common
            )
            val_mae = float(info.val_mae) if info.val_mae > 0 else t.val_mae
            if hidden and not info.hidden_dim:
                raise ConfigError(
                    "distill.loss: hint needs the teacher's hidden states, and this teacher "
                    "service does not stream them (a server older than the HIDDEN output): "
                    "serve the teacher with this version of stkd",
                    where=t.name,
                )
            out.append(
                replace(
                    t,
                    version=info.teacher_version,
                    val_mae=val_mae,
                    hidden_dim=int(info.hidden_dim) if hidden else 0,
                )
            )
        elif t.kind == "cache":
            cache = LabelCache(t.location)
            if cache.fingerprint != fingerprint:
                raise StoreError(
                    f"the cache holds labels for dataset {cache.fingerprint}, the student's "
                    f"dataset is {fingerprint}",
                    where=t.name,
                )
            _check_labels(
                t.name, cache.window_shape, cache.ranges.get(split), cache.has_spread, **common
            )
            if hidden and not cache.hidden_dim:
                raise StoreError(hint_cache_message(), where=t.name)
            if not cache.is_complete(split):
                raise StoreError(
                    f"the cache holds {cache.filled_windows(split)} of the {len(windows)} {split} "
                    "windows; complete it with `stkd precompute-labels`",
                    where=t.name,
                )
            out.append(
                replace(
                    t,
                    version=cache.version,
                    val_mae=cache.val_mae or t.val_mae,
                    hidden_dim=cache.hidden_dim if hidden else 0,
                )
            )
        else:
            raise ConfigError("start the replicas before resolving the teachers", where=t.name)
    return tuple(out)
