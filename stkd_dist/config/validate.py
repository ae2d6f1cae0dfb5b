"""Checks of a config against the registries: models and their kwargs, the distillation loss.

The schema (:mod:`.base`) checks keys and types; this module checks that the named model exists
and accepts its kwargs (by building it on tiny dimensions, so a value the model rejects is caught
too) and that the distillation loss exists and accepts the ``distill`` settings. Training commands
run it before they start a cluster, so a typo fails in a second instead of on every worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from stkd_dist.config.models import LOSS_PARAMETERS, DistillSection
from stkd_dist.config.schema import ROLES, Config
from stkd_dist.errors import ConfigError, StkdError

if TYPE_CHECKING:
    import pandas as pd


def build_small(cfg: Config, role: str, source: str | None = None) -> Any:
    """``cfg.<role>``'s model (a ``Forecaster``) built on small dimensions (3 nodes).

    Raises :class:`ConfigError` naming ``<role>.model`` / ``<role>.kwargs`` for an unknown model
    or a kwarg it does not take or rejects.
    """
    # imported here: torch is needed only to build a model, not to load or print a config
    from stkd_dist.data.batch import DataDims
    from stkd_dist.models import build_forecaster

    section = cfg.model(role)
    dims = DataDims(
        nodes=3,
        input_steps=cfg.data.input_steps,
        horizon=cfg.data.horizon,
        in_channels=len(cfg.data.input_channels or ("c",)),
        out_channels=len(cfg.data.target_channels or cfg.data.input_channels or ("c",)),
    )
    prefix = f"{source}: " if source else ""
    try:
        model = build_forecaster(section.model, dims, **section.kwargs)
    except StkdError as e:
        raise ConfigError(e.message, where=f"{prefix}{role}.model/{role}.kwargs") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), where=f"{prefix}{role}.kwargs") from None
    return model


def weekday_check(
    cfg: Config, time: pd.DatetimeIndex, roles: Sequence[str] = ROLES
) -> dict[str, Any] | None:
    """The ``weekday_check`` entry, or None when every model can learn what it is evaluated on.

    A model with a day-of-week embedding (``dow_dim`` > 0) evaluated on weekdays that the training
    split does not hold forecasts those days with untrained vectors: a finding, and a one-line
    warning naming the ``<role>.kwargs.dow_dim`` keys to set to 0. ``distill`` checks both
    models; ``train-teacher`` and ``train-student`` check the one they train (``roles``).
    """
    # imported here: pandas is needed only with a store's time axis, not to load a config
    from stkd_dist.data.calendar import split_weekdays, unseen_weekdays, weekday_names

    unseen = unseen_weekdays(time, cfg.data.splits())
    learning = [r for r in roles if build_small(cfg, r).learns_weekdays]
    if not unseen or not learning:
        return None
    keys = " and ".join(f"{r}.kwargs.dow_dim" for r in learning)
    trained = weekday_names(split_weekdays(time, cfg.data.splits())["train"])
    message = (
        f"warning: the training split holds {trained} only; the validation/test splits also hold "
        f"{weekday_names(unseen)}, whose day-of-week embedding the {' and '.join(learning)} never "
        f"{'trains' if len(learning) == 1 else 'train'}: set {keys} to 0 for a store this short"
    )
    return {"unseen_weekdays": unseen, "roles": learning, "message": message}


def validate_model(cfg: Config, role: str, source: str | None = None) -> None:
    """Build ``cfg.<role>``'s model on small dimensions; unknown keys or kwargs raise."""
    model = build_small(cfg, role, source)
    section = cfg.model(role)
    prefix = f"{source}: " if source else ""
    if role == "teacher" and cfg.teacher.dataset is not None and not model.transferable:
        raise ConfigError(
            f"teacher.dataset trains the teacher on another dataset, but {section.model!r} "
            "learns per-node parameters that do not exist on data.dataset: set teacher.model to "
            "a transferable model (stgnn_inductive) or remove teacher.dataset",
            where=f"{prefix}teacher.model",
        )


def distill_loss_kwargs(section: DistillSection) -> dict[str, Any]:
    """The ``distill`` fields the registered loss ``section.loss`` takes, as its kwargs.

    Raises :class:`ConfigError` (``where = "distill.<field>"``) for a loss parameter that is set
    but not taken by the chosen loss: silently ignoring it would run another experiment than the
    one the config describes.
    """
    import inspect

    from stkd_dist.distill import LOSSES

    params = inspect.signature(LOSSES.get(section.loss)).parameters
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        is_set = value is not None and not (f.name == "confidence_weighting" and not value)
        if f.name in params:
            if is_set:
                kwargs[f.name] = value
        elif is_set and (f.name in LOSS_PARAMETERS or f.name == "confidence_weighting"):
            takes = [k for k in _LOSS_FIELDS if k in params]
            losses = LOSSES.keys()  # a sorted list (the registry is not iterable)
            others = [k for k in losses if f.name in _parameters(k)]
            raise ConfigError(
                f"loss {section.loss!r} does not take {f.name!r} (it takes "
                f"{', '.join(takes) or 'none of the loss fields'}); remove distill.{f.name} or "
                f"set distill.loss to one that takes it ({', '.join(others) or 'none'})",
                where=f"distill.{f.name}",
            )
    return kwargs


#: the ``distill`` fields a loss may take, in the order error messages list them
_LOSS_FIELDS = ("alpha", "task", *LOSS_PARAMETERS, "confidence_weighting")


def _parameters(key: str) -> list[str]:
    import inspect

    from stkd_dist.distill import LOSSES

    return list(inspect.signature(LOSSES.get(key)).parameters)


def validate_distill(cfg: Config, source: str | None = None) -> None:
    """Build the ``distill.loss`` from the ``distill`` section; unknown keys or values raise."""
    from stkd_dist.distill import build_loss

    prefix = f"{source}: " if source else ""
    try:
        kwargs = distill_loss_kwargs(cfg.distill)
    except ConfigError as e:
        # an unknown loss key is about distill.loss; a parameter error names its own field
        where = e.where if (e.where or "").startswith("distill.") else "distill.loss"
        raise ConfigError(e.message, where=f"{prefix}{where}") from None
    try:
        build_loss(cfg.distill.loss, **kwargs)
    except StkdError as e:
        # the losses name their arguments "loss.<name>"; anything else is about the key itself
        where = (
            (e.where or "").removeprefix("loss.") if (e.where or "").startswith("loss.") else "loss"
        )
        raise ConfigError(e.message, where=f"{prefix}distill.{where}") from None


def validate_config(
    cfg: Config, roles: Iterable[str] = ROLES, distill: bool = True, source: str | None = None
) -> None:
    """Run the registry checks for ``roles`` (and ``distill``); raises :class:`ConfigError`."""
    for role in roles:
        validate_model(cfg, role, source)
    if distill:
        validate_distill(cfg, source)
