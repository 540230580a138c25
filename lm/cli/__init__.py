"""`lm train | train-group | eval | sample | generate | serve | bench | compile | quantize |
import hf | export hf | prune | linearize | sweep | results | analyze | launch
{local,tpu,slurm} | data prepare`.

Each command group is one module here (lm/cli/<group>.py) that declares its commands as
`COMMANDS = [Command(...)]` (lm/cli/command.py): arguments, handler, and how it runs.
A new command is such a module plus its name in `MODULES`.

What every command shares happens here, once: user-caused errors (bad config, bad data,
missing run) print one line and exit 2; a full disk anywhere prints one line naming the
path and exits 4 (lm/errors.py holds the exit codes, README "When things go wrong" what
each means); inside a pod a command runs under the pod guard and joins the pod.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lm.cli.command import Command
from lm.errors import EXIT_DISK_FULL, EXIT_USER_ERROR, find_disk_full

#: The command modules under lm/cli/, in `lm --help` order.
MODULES = ("train", "eval", "sample", "generate", "serve", "bench", "compile", "quantize",
           "interop", "prune", "linearize", "sweep", "launch", "data", "config")


def commands() -> dict[str, Command]:
    """Every top-level command by name, from the modules of `MODULES`."""
    out: dict[str, Command] = {}
    for module in MODULES:
        for c in importlib.import_module(f"lm.cli.{module}").COMMANDS:
            if c.name in out:
                raise ValueError(f"lm {c.name}: declared twice (lm/cli/{module}.py)")
            out[c.name] = c
    return out


def build_parser(cmds: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description="lmlab: train and study language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in (cmds or commands()).values():
        c.add_to(sub)
    return parser


def _split_remote(argv: list[str], cmds: dict[str, Command]) -> tuple[list[str], list[str] | None]:
    """`lm launch ... -- <command>`: (the launcher's args, the command or None)."""
    c = cmds.get(argv[0]) if argv else None
    if c is None or not c.remote or "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _in_a_pod() -> bool:
    """This process is one of a pod's and not yet the guarded child (lm/parallel/guard.py)."""
    import os

    from lm.errors import ConfigError  # (lm.config would import JAX into the guard)
    from lm.parallel.distributed import detect
    from lm.parallel.guard import GUARDED
    if os.environ.get(GUARDED):
        from lm.parallel.guard import die_with_parent
        die_with_parent()
        return False
    try:
        return detect(os.environ) is not None
    except ConfigError:
        return False  # reported by the command's own start-up, one line


def main(argv: list[str] | None = None) -> int:
    full_argv = None if argv is None else list(argv)
    if argv is None:  # run as a program (not called from Python): host malloc first
        from lm.hostmem import reexec_with_host_malloc
        reexec_with_host_malloc(sys.argv[1:])
    cmds = commands()
    argv, remote = _split_remote(list(sys.argv[1:] if argv is None else argv), cmds)
    args = build_parser(cmds).parse_args(argv)
    args.remote = remote
    command = cmds[args.command]
    if not command.launcher and _in_a_pod():  # run it in a child that is watched
        from lm.parallel.guard import run_guarded
        return run_guarded(sys.argv[1:] if full_argv is None else full_argv)
    if command.before_jax is not None:
        command.before_jax()
    if not command.launcher:
        from lm.compile import quiet_libtpu
        quiet_libtpu()  # libtpu (lmlab[tpu] or [test]) on a machine without TPUs: no noise
        from lm.hostmem import configure_jax
        configure_jax()
    from lm.parallel.distributed import exiting
    code = _run(args, command)
    exiting(code)  # peers of a pod that leave as well are no news now
    return code


def _run(args, command: Command) -> int:
    from lm.config import ConfigError
    from lm.data import DataError
    try:
        if not command.launcher:  # join the pod, if the environment describes one
            from lm.parallel.distributed import initialize_from_env
            initialize_from_env()
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        full = find_disk_full(e)  # wherever it was written: one line, not a traceback
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_DISK_FULL
