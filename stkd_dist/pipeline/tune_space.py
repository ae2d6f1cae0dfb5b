"""The sweep's search space on the Ray side: Tune distributions and per-trial configs.

:mod:`stkd_dist.config.sweep` parses ``sweep.space`` into :class:`ParamSpec` s. Here they become
Ray Tune sampling objects (:func:`to_tune`), a trial's sampled values become a full
:class:`Config` (:func:`apply_params`), and :func:`check_space` validates every bound and choice
against the whole config before a single trial starts.

Model arguments and model choice: with ``student.model: {choice: [mlp, linear]}`` and
``student.kwargs.embed_dim: {choice: [16, 32]}``, a trial that draws ``linear`` drops
``embed_dim`` (``linear`` takes no such argument) instead of failing, and so are the config's own
``student.kwargs`` that the drawn model does not take; every swept model argument must be accepted
by at least one of the models a trial can draw.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from stkd_dist.config import Config, from_mapping, to_mapping
from stkd_dist.config.base import convert_value, resolve_key
from stkd_dist.config.sweep import KWARGS_PREFIX, MODEL_KEY, ParamSpec
from stkd_dist.errors import ConfigError, StkdError


def to_tune(specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: dotted key -> sampling object (flat, one level)."""
    from ray import tune

    out: dict[str, Any] = {}
    for spec in specs:
        a = spec.args
        d = spec.distribution
        if d == "uniform":
            out[spec.key] = tune.uniform(a[0], a[1])
        elif d == "quniform":
            out[spec.key] = tune.quniform(a[0], a[1], a[2])
        elif d == "loguniform":
            out[spec.key] = tune.loguniform(a[0], a[1])
        elif d == "randint":
            out[spec.key] = tune.randint(a[0], a[1])
        elif d == "lograndint":
            out[spec.key] = tune.lograndint(a[0], a[1])
        elif d == "choice":
            out[spec.key] = tune.choice(list(a))
        elif d == "grid":
            out[spec.key] = tune.grid_search(list(a))
        else:  # parse_space only lets the names above through
            raise AssertionError(f"unhandled distribution {d!r}")
    return out


def model_arguments(model: str) -> set[str] | None:
    """Keyword arguments model ``model`` takes; None when it takes any (``**kwargs``)."""
    from stkd_dist.models import MODELS

    params = inspect.signature(MODELS.get(model)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("self", "dims", "adjacency")}


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def plain(value: Any) -> Any:
    """A sampled value as plain Python (Tune may hand out NumPy scalars)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def apply_params(cfg: Config, params: Mapping[str, Any], source: str = "sweep trial") -> Config:
    """``cfg`` with each dotted key of ``params`` set to its value, validated.

    Swept model arguments (``student.kwargs.X``) the trial's model does not take are dropped;
    everything else must fit its key's type and range (:class:`ConfigError` otherwise).
    """
    data = to_mapping(cfg)
    model = str(params.get(MODEL_KEY, cfg.student.model))
    takes = model_arguments(model) if params else None
    if MODEL_KEY in params and takes is not None:
        # the config's own student.kwargs were written for its model: keep what the drawn one takes
        base = data["student"]["kwargs"]
        data["student"]["kwargs"] = {k: v for k, v in base.items() if k in takes}
    for key, raw in params.items():
        value = plain(raw)
        if _dropped(key, takes):
            continue  # another model's argument (see the module docstring)
        convert_value(value, resolve_key(Config, key, source), key, source)
        _set(data, key, value)
    return from_mapping(Config, data, source=source)


def _dropped(key: str, takes: set[str] | None) -> bool:
    """Whether swept key ``key`` is a model argument the trial's model (taking ``takes``) lacks."""
    if not key.startswith(KWARGS_PREFIX) or takes is None:
        return False
    return key.removeprefix(KWARGS_PREFIX).split(".")[0] not in takes


def _models(cfg: Config, specs: tuple[ParamSpec, ...]) -> tuple[str, ...]:
    for spec in specs:
        if spec.key == MODEL_KEY:
            return tuple(str(v) for v in spec.args)
    return (cfg.student.model,)


def check_space(cfg: Config) -> tuple[ParamSpec, ...]:
    """Check every bound and listed value of ``cfg.sweep.space`` against the whole config.

    Each candidate value (see :attr:`ParamSpec.candidates`) is applied on its own to the config,
    which is then validated (value ranges) and its student model and distillation loss built on
    small dimensions, with each model a trial can draw. Returns the parsed space.

    Raises:
        ConfigError: at ``sweep.space.<key>``, naming the value that fails and why.
    """
    from stkd_dist.config.validate import validate_distill, validate_model
    from stkd_dist.models import MODELS, STUDENTS

    specs = cfg.sweep.params()
    models = _models(cfg, specs)
    for model in models:
        if model not in MODELS or MODELS.role(model) != "student":
            raise ConfigError(
                f"{model!r} is not a student model; students: {', '.join(STUDENTS.keys())}",
                where=f"sweep.space.{MODEL_KEY}",
            )
    for spec in specs:
        where = f"sweep.space.{spec.key}"
        if spec.key.startswith(KWARGS_PREFIX):
            name = spec.key.removeprefix(KWARGS_PREFIX).split(".")[0]
            takers = [m for m in models if (t := model_arguments(m)) is None or name in t]
            if not takers:
                raise ConfigError(
                    f"no model a trial can draw ({', '.join(models)}) takes the argument {name!r}",
                    where=where,
                )
        else:
            takers = list(models)
        for value in spec.candidates:
            for model in takers:
                params = {spec.key: value}
                if spec.key != MODEL_KEY:
                    params[MODEL_KEY] = model
                try:
                    trial = apply_params(cfg, params, source="sweep")
                    validate_model(trial, "student")
                    validate_distill(trial)
                except StkdError as e:
                    detail = f" with student.model {model!r}" if len(models) > 1 else ""
                    raise ConfigError(
                        f"the value {value!r}{detail} is not usable: {e}", where=where
                    ) from None
    return specs


def sampled(params: Mapping[str, Any], specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """The values of the swept keys in ``params`` (a trial's config), as plain Python."""
    return {s.key: plain(params[s.key]) for s in specs if s.key in params}


def applied(cfg: Config, params: Mapping[str, Any], specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """The swept values a trial used: like :func:`sampled`, with None for a model argument that
    the trial's model does not take (it was dropped, see the module docstring)."""
    values = sampled(params, specs)
    takes = model_arguments(str(values.get(MODEL_KEY, cfg.student.model)))
    return {k: (None if _dropped(k, takes) else v) for k, v in values.items()}
