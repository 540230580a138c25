"""The CLI is one module per command group (lm/cli/<group>.py) declaring `Command`
records: a new command is a module plus one line in `lm.cli.MODULES`, and gets the shared
error handling (a user error: one line, exit 2) without code of its own."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import lm

from lm import cli
from lm.cli.command import Command
from lm.errors import ConfigError


@pytest.fixture
def hello_command(monkeypatch):
    """A command module `lm.cli.hello` added as a newcomer would: COMMANDS + one line."""
    def run(args) -> int:
        if args.name == "bad":
            raise ConfigError(f"lm hello --name {args.name!r}: not a name")
        print(f"hello {args.name}")
        return 0

    module = types.ModuleType("lm.cli.hello")
    module.COMMANDS = [Command("hello", "greet", lambda p: p.add_argument("--name", default="world"),
                               run)]
    monkeypatch.setitem(sys.modules, "lm.cli.hello", module)
    monkeypatch.setattr(cli, "MODULES", (*cli.MODULES, "hello"))


def test_a_new_command_is_a_module_and_one_line(hello_command, lm_here):
    r = lm_here("hello", "--name", "lm")
    assert (r.returncode, r.stdout) == (0, "hello lm\n"), r.stderr
    r = lm_here("hello", "--name", "bad")
    assert r.returncode == 2 and r.stderr == "error: lm hello --name 'bad': not a name\n"
    assert "hello" in lm_here("--help").stdout


def test_a_command_name_is_declared_once(monkeypatch):
    monkeypatch.setattr(cli, "MODULES", (*cli.MODULES, "train"))
    with pytest.raises(ValueError, match="lm train: declared twice"):
        cli.commands()


def test_a_command_has_a_handler_or_subcommands():
    with pytest.raises(TypeError):
        Command("x", "neither")
    with pytest.raises(TypeError):
        Command("x", "both", run=lambda a: 0, subcommands=[Command("y", "y", run=lambda a: 0)])


def test_python_dash_m_lm_cli_lists_every_command():
    r = lm("--help")
    assert r.returncode == 0, r.stderr
    for name in cli.commands():
        assert f"    {name} " in r.stdout, name
