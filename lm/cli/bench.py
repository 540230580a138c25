"""`lm bench`: training throughput (tokens/s, MFU) of a config."""

from __future__ import annotations

from lm.cli.command import Command, config_options, load_config


def arguments(p) -> None:
    config_options(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--loop-rounds", type=int, default=2,
                   help="rounds of (bare step, lm train loop) measuring the loop's overhead "
                        "(0 = bare step only)")


def bench(args) -> int:
    from lm.bench import bench
    bench(load_config(args), steps=args.steps, loop_rounds=args.loop_rounds)
    return 0


COMMANDS = [Command("bench", "training throughput (tokens/s, MFU) of a config", arguments, bench)]
