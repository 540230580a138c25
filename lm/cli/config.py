"""`lm config --show [SECTION] [--markdown]`: the knob reference, generated from the
field declarations (lm/config_reference.py)."""

from __future__ import annotations

from lm.cli.command import Command


def arguments(p) -> None:
    p.add_argument("--show", nargs="?", const="", default="", metavar="SECTION",
                   help="one section (e.g. model.attention); default: all")
    p.add_argument("--markdown", action="store_true",
                   help="all built-in sections as docs/config-reference.md")


def show(args) -> int:
    from lm import config_reference as ref
    print(ref.markdown() if args.markdown else ref.text(args.show or None), end="")
    return 0


COMMANDS = [Command("config", "every config knob: type, default, roles, meaning", arguments, show)]
