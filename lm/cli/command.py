"""What every `lm` command shares: the `Command` record a command module declares, the
common options (--config / --set, --run) and reading a config from them.

A command module (lm/cli/<group>.py) defines its arguments and handler and lists them as
`COMMANDS = [Command(...)]`; lm/cli/__init__.py names the module once in `MODULES`. The
handler returns the exit code; it raises `ConfigError` / `DataError` for what a user can
get wrong, which `lm.cli.main` prints as one line with exit 2 (and a full disk as one
line with exit 4) for every command alike. Nothing here imports JAX: `lm --help` and the
pod guard stay light, so handlers import what they use inside themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lm.configs import DEFAULT_CONFIG
from lm.errors import EXIT_USER_ERROR


@dataclass(frozen=True)
class Command:
    """One `lm NAME` command, or a group of subcommands (`lm data prepare`).

    name / help / description: as argparse shows them.
    arguments(parser): adds the command's options.  run(args) -> exit code.
    subcommands: a group's commands (then `arguments` / `run` stay None); the chosen one
        is `args.<name>_command`.
    one_line_usage: the subcommands' usage errors as one line, exit 2 (`lm launch`).
    remote: everything after `--` is a command line handed on (`lm launch ... -- train`),
        `args.remote` (None without `--`).
    launcher: the command starts a pod's processes rather than being one of them: it does
        not join a pod, is not run under the pod guard and sets up no JAX.
    before_jax(): called before JAX starts, e.g. `lm compile` keeps JAX off accelerators.
    """

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: Sequence[Command] = ()
    description: str | None = None
    one_line_usage: bool = False
    remote: bool = False
    launcher: bool = False
    before_jax: Callable[[], None] | None = None

    def __post_init__(self):
        if bool(self.subcommands) == (self.run is not None):
            raise TypeError(f"Command {self.name!r}: give either run or subcommands")

    def add_to(self, subparsers) -> argparse.ArgumentParser:
        kw = {"description": self.description} if self.description else {}
        p = subparsers.add_parser(self.name, help=self.help, **kw)
        if self.arguments is not None:
            self.arguments(p)
        if self.subcommands:
            sub = p.add_subparsers(
                dest=f"{self.name}_command", required=True,
                **({"parser_class": OneLineParser} if self.one_line_usage else {}))
            for c in self.subcommands:
                c.add_to(sub)
        else:
            p.set_defaults(fn=self.run)
        return p


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, exit 2 (argparse's default prints the usage first)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


# ------------------------------------------------------------------ common options


def overrides_option(p: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=help)


def engine_options(p: argparse.ArgumentParser, batch: int) -> None:
    """The inference engine's size and scheduling switches (lm/infer; docs/inference.md),
    for commands that build one (`batch`: the command's default --batch):
    `engine_settings(args)` checks them and turns the switches into Engine kwargs."""
    p.add_argument("--batch", type=int, default=batch,
                   help="sequences decoded together (the engine's slots)")
    p.add_argument("--pages", type=int, default=0,
                   help="K/V pages in the pool (0 = enough for --batch sequences of the "
                        "model's max_seq_len); fewer make requests wait for pages")
    p.add_argument("--page-size", type=int, default=16, help="tokens per K/V page")
    p.add_argument("--prefill-tokens", type=int, default=0,
                   help="prompt tokens one prefill takes (0 = max(max_seq_len, 512); a "
                        "longer prompt still goes whole)")
    p.add_argument("--no-pack", action="store_true",
                   help="prefill one prompt a row (padded) instead of packing several")
    p.add_argument("--no-share-prefixes", action="store_true",
                   help="do not share the pages of a prompt prefix already in the pool")
    p.add_argument("--no-hydragen", action="store_true",
                   help="decode shared prefixes through each row's own page table")


def engine_settings(args) -> dict:
    from lm.errors import ConfigError
    for flag, value, ok, want in (
            ("--batch", args.batch, args.batch >= 1, ">= 1"),
            ("--pages", args.pages, args.pages == 0 or args.pages >= 2, "0 (auto) or >= 2"),
            ("--page-size", args.page_size, args.page_size >= 1, ">= 1"),
            ("--prefill-tokens", args.prefill_tokens, args.prefill_tokens >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"lm {args.command} {flag} must be {want}, got {value}")
    return dict(prefill_tokens=args.prefill_tokens, pack_prefill=not args.no_pack,
                share_prefixes=not args.no_share_prefixes, hydragen=not args.no_hydragen)


def config_options(p: argparse.ArgumentParser) -> None:
    """--config FILE and --set KEY=VALUE: the config a command trains / measures."""
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="Python config file with a config() function (default: configs/default.py)")
    overrides_option(p, "override a config value, e.g. --set model.n_layers=4 (repeatable)")


def run_option(p: argparse.ArgumentParser) -> None:
    """--run DIR: the run a command reads (its config and latest checkpoint)."""
    p.add_argument("--run", required=True, help="run directory")


def load_config(args):
    """The validated TrainConfig of --config, --set (and --init-from, where the command
    has it: the source run or HF directory then fixes the model; --distill-from: the
    teacher)."""
    from lm.config import resolve
    overrides = list(args.overrides)
    if getattr(args, "distill_from", ""):
        overrides.append(f"distill.teacher={args.distill_from}")
    if getattr(args, "init_from", ""):
        overrides.append(f"init_from={args.init_from}")
    cfg = resolve(args.config, overrides)
    if cfg.init_from:  # the source fixes the model (lm/train/param_source.py)
        from lm.train.param_source import with_source_model
        cfg = with_source_model(cfg, overrides)
    if cfg.distill.teacher:  # the hidden-state loss's projection takes the teacher's width
        from lm.compress.teacher import with_teacher_width
        cfg = with_teacher_width(cfg)
    return cfg
