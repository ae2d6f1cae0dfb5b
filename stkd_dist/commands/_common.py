"""Options shared by the training commands (``train-teacher``, ``train-student``, ``distill``, ...).

:func:`add_config_args` adds ``--config`` and the common overrides; :func:`config_from_args` turns
them into a validated :class:`~stkd_dist.config.Config`. The specific flags are applied after the
``--set`` overrides, as ``--set`` items themselves, so they are checked the same way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from stkd_dist.config import ROLES, Config, load_config
from stkd_dist.location import set_storage_options

CONFIG_HELP = "a preset name (`stkd config list`) or a YAML file (default: %(default)s)"


def workers_arg(text: str) -> int | dict[str, int]:
    """``--workers``: ``N`` or ``MIN-MAX`` (``cluster.num_workers: {min, max}``)."""
    lo, sep, hi = text.partition("-")
    try:
        if not sep:
            return int(text)
        return {"min": int(lo), "max": int(hi)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of workers or a range MIN-MAX (e.g. 2-4), got {text!r}"
        ) from None


def add_config_args(parser: argparse.ArgumentParser, default_config: str = "demo") -> None:
    """Add ``--config`` and the common overrides to a training command's parser."""
    group = parser.add_argument_group("configuration (override the config file)")
    group.add_argument("--config", "-c", default=default_config, metavar="CFG", help=CONFIG_HELP)
    group.add_argument(
        "--data", metavar="STORE", help="dataset: a store path or a dataset name (data.dataset)"
    )
    group.add_argument(
        "--epochs", type=int, metavar="N", help="epochs of the model(s) trained (schedule.epochs)"
    )
    group.add_argument(
        "--workers",
        type=workers_arg,
        metavar="N|MIN-MAX",
        help="data-parallel workers (cluster.num_workers); MIN-MAX, e.g. 2-4, trains elastically "
        "on as many as the cluster has room for",
    )
    group.add_argument(
        "--run-name", metavar="NAME", help="run name under <storage>/runs (run.name)"
    )
    group.add_argument(
        "--address",
        metavar="RAY_ADDRESS",
        help="Ray cluster to connect to (cluster.address; default $RAY_ADDRESS, else local)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set teacher.optim.lr=3e-4 (repeatable)",
    )


def flag_overrides(args: argparse.Namespace, roles: Sequence[str] = ROLES) -> list[str]:
    """The common flags of ``args`` as ``key=value`` overrides (values JSON-quoted, valid YAML)."""
    out: list[str] = []

    def put(key: str, value: object) -> None:
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")

    put("data.dataset", getattr(args, "data", None))
    for role in roles:
        put(f"{role}.schedule.epochs", getattr(args, "epochs", None))
    put("cluster.num_workers", getattr(args, "workers", None))
    put("run.name", getattr(args, "run_name", None))
    put("cluster.address", getattr(args, "address", None))
    return out


def config_from_args(args: argparse.Namespace, roles: Sequence[str] = ROLES) -> Config:
    """Load ``args.config`` with ``--set`` overrides, then the common flags for ``roles``."""
    overrides = [*getattr(args, "overrides", []), *flag_overrides(args, roles)]
    cfg = load_config(args.config, overrides)
    # before any storage path is opened; also inherited by the Ray workers this process starts
    set_storage_options(cfg.storage.options)
    return cfg


def warn_untrained_weekdays(cfg: Config, storage: str | None, role: str) -> None:
    """Print the one-line ``weekday_check`` warning when ``cfg.<role>``'s day-of-week embedding
    cannot train on the store's training split (``distill`` records it in ``metrics.json``)."""
    from stkd_dist.config.validate import weekday_check
    from stkd_dist.errors import StkdError
    from stkd_dist.storage import open_store

    try:
        store = open_store(cfg.data.dataset, storage)
    except StkdError:
        return  # the training call reports a missing or unreadable store, with its fix
    entry = weekday_check(cfg, store.time, roles=(role,))
    if entry is not None:
        print(entry["message"])
