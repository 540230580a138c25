"""`lm data prepare`: tokenize a corpus once into shards."""

from __future__ import annotations

import json
import os
import sys

from lm.cli.command import Command, config_options, load_config


def prepare_arguments(p) -> None:
    config_options(p)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes tokenizing work units (default: all cores); the "
                        "output does not depend on it")


def prepare(args) -> int:
    from lm.data import prepare
    cfg = load_config(args)
    stats = prepare(cfg.data, args.out, workers=args.workers,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(stats))
    secs = max(stats["seconds"], 1e-9)
    tokens = stats["train"]["tokens"] + stats["validation"]["tokens"]
    mb = stats["input_bytes"] / 1e6
    print(f"prepare: {mb:.1f} MB in {secs:.1f} s ({args.workers} workers): "
          f"{mb / secs:.1f} MB/s, {tokens / secs / 1e6:.2f} M tokens/s")
    for key, src in stats["sources"].items():
        parts = ", ".join(f"{s} {src[s]['docs']:,} docs {src[s]['tokens']:,} tokens"
                          for s in ("train", "validation") if src[s]["docs"])
        print(f"  {key}={src['spec']}: {parts}")
    if stats.get("skipped_files"):
        print(f"  skipped {stats['skipped_files']} unreadable file(s) "
              "(data.on_bad_shard=skip)")
    print(f"prepared {args.out}; train on it with --set data.corpus={args.out}")
    return 0


COMMANDS = [Command("data", "data tools", subcommands=[
    Command("prepare", "tokenize a corpus once into shards", prepare_arguments, prepare)])]
