"""``stkd config``: list the built-in presets, show one resolved, validate a config file."""

from __future__ import annotations

import argparse
import dataclasses

from stkd_dist.commands import SUMMARIES
from stkd_dist.config import Config, dump_config, load_config, preset_names, preset_text
from stkd_dist.config.loader import read_source
from stkd_dist.config.validate import validate_config

EPILOG = """\
examples:
  stkd config list
  stkd config show demo > my-run.yaml          # every key, with its value
  stkd config show los-loop --set teacher.schedule.epochs=5
  stkd config validate my-run.yaml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    parser = subparsers.add_parser(
        "config",
        help=SUMMARIES["config"],
        description=(
            f"Configurations are YAML files with the sections {sections}; built-in presets "
            "are ready-made ones. Every training command takes --config PRESET|FILE and "
            "--set KEY=VALUE overrides."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="list the built-in presets").set_defaults(func=run_list)
    show = sub.add_parser("show", help="print a preset or file fully resolved, as YAML")
    show.add_argument("name", metavar="PRESET|FILE")
    show.add_argument("--raw", action="store_true", help="print the preset file as written instead")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=run_show)
    validate = sub.add_parser(
        "validate", help="check a config: keys, types, ranges, models and losses"
    )
    validate.add_argument("file", metavar="FILE|PRESET")
    validate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    validate.set_defaults(func=run_validate)


def run_list(args: argparse.Namespace) -> int:
    for name in preset_names():
        first = preset_text(name).splitlines()[0] if preset_text(name) else ""
        print(f"{name:<16} {first.removeprefix('#').strip()}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    if args.raw:
        print(read_source(args.name)[0], end="")
        return 0
    print(dump_config(load_config(args.name, args.overrides)), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    _, source, _ = read_source(args.file)
    validate_config(cfg, source=source)
    print(
        f"ok: {source} (run {cfg.run_name!r}, data {cfg.data.dataset!r}, "
        f"teacher {cfg.teacher.model!r}, student {cfg.student.model!r}, "
        f"{cfg.cluster.describe_workers()} worker(s))"
    )
    return 0
