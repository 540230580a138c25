"""`lm data prepare`: tokenize a corpus once into shards."""

from __future__ import annotations

import json

from lm.cli.command import Command, config_options, load_config


def prepare_arguments(p) -> None:
    config_options(p)
    p.add_argument("--out", required=True)


def prepare(args) -> int:
    from lm.data import prepare
    cfg = load_config(args)
    stats = prepare(cfg.data, args.out)
    print(json.dumps(stats))
    print(f"prepared {args.out}; train on it with --set data.corpus={args.out}")
    return 0


COMMANDS = [Command("data", "data tools", subcommands=[
    Command("prepare", "tokenize a corpus once into shards", prepare_arguments, prepare)])]
