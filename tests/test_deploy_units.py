"""Supervision: every long-running process of the Procfile has a systemd unit that restarts it, running the same command."""

import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
LONG_RUNNING = ("web", "worker", "beat")


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((UNITS / f"keyvault-{name}.service").read_text())
    return parser


def same_command(command: str) -> str:
    """Without the virtualenv's path and shell defaults (``${X:-4}``; systemd sets the default with Environment=)."""
    program, _, rest = command.partition(" ")
    return f"{Path(program).name} {re.sub(r':-[^}]*}', '}', rest)}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_each_process_has_a_unit_that_restarts_it_whatever_the_exit(name):
    service = unit(name)["Service"]

    assert service["Restart"] == "always"
    assert unit(name)["Unit"]["StartLimitIntervalSec"] == "0"  # an outage may outlast any start limit
    assert same_command(service["ExecStart"]) == same_command(procfile()[name])


def test_the_target_starts_every_long_running_process():
    wants = (UNITS / "keyvault.target").read_text()

    assert all(f"keyvault-{name}.service" in wants for name in LONG_RUNNING)
