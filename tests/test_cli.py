"""The ``stkd`` entry point: every command listed, only the requested command's module loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stkd_dist.cli import COMMANDS, build_parser, main, requested_command
from stkd_dist.commands import SUMMARIES


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["plan", "demo"], "plan"),
        (["--storage", "plan", "info", "x"], "info"),  # "plan" is --storage's value here
        (["--debug", "--storage=s", "train-teacher", "--config", "demo"], "train-teacher"),
        (["--help"], None),
        ([], None),
        (["nope", "plan"], None),  # an unknown command is argparse's to report, not skipped
    ],
)
def test_requested_command(argv: list[str], expected: str | None) -> None:
    assert requested_command(argv) == expected


def test_help_lists_every_command_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    packed = "".join(out.split())  # argparse wraps the summaries, also at hyphens
    for name in COMMANDS:
        assert f"    {name} " in out or f"    {name}\n" in out
        assert "".join(SUMMARIES[name].split()) in packed


def test_every_command_module_registers_its_listed_name() -> None:
    # the full parser (every module imported) accepts each command's --help
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0


def test_unknown_command_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["trian-teacher"])
    assert exit_.value.code == 2
    assert "invalid choice: 'trian-teacher'" in capsys.readouterr().err


def test_help_and_job_commands_do_not_load_torch() -> None:
    # A fresh interpreter: `stkd --help`, `stkd submit --help` and `stkd config list` must not
    # pay for importing torch (seconds on a small machine).
    code = (
        "import sys\n"
        "from stkd_dist.cli import main\n"
        "for argv in (['--help'], ['submit', '--help'], ['jobs', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['config', 'list']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
