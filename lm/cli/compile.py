"""`lm compile`: compile the train step (or, with --decode, the inference engine's decode
step) for a TPU topology (no TPU needed)."""

from __future__ import annotations

import os

from lm.cli.command import Command, config_options, load_config


def arguments(p) -> None:
    config_options(p)
    p.add_argument("--topology", required=True,
                   help="e.g. v5p-64, v5p:4x4x4, v6e-256, v5e:2x2 (libtpu names or accelerator types)")
    p.add_argument("--slices", type=int, default=1, help="multislice: slices over DCN")
    p.add_argument("--suggest", action="store_true",
                   help="enumerate meshes and remat policies, compile the most promising, rank")
    p.add_argument("--max-compiles", type=int, default=4, help="with --suggest")
    p.add_argument("--json", default="", metavar="PATH", help="also write the report(s) as JSON")
    p.add_argument("--train-only", action="store_true", help="skip the eval step's compile")
    p.add_argument("--trials", type=int, default=1, metavar="K",
                   help="compile the step of K batched trials of the config (lm sweep --batch)")
    p.add_argument("--decode", action="store_true",
                   help="compile one decode step of the batched engine (lm/infer) instead: "
                        "per-chip params, page pool, temporaries, peak")
    p.add_argument("--slots", type=int, default=32,
                   help="with --decode: sequences decoded together (rows of one token)")
    p.add_argument("--pages", type=int, default=0,
                   help="with --decode: K/V pages in the pool (0 = enough for --slots "
                        "sequences of model.max_seq_len)")
    p.add_argument("--page-size", type=int, default=16, help="with --decode: tokens per page")


def host_only() -> None:
    """TPU topologies are compiled for from the host; never claim a local accelerator
    (lm.compile.topology_devices then tells libtpu there is no TPU pod here)."""
    os.environ["JAX_PLATFORMS"] = "cpu"


def compile_step(args) -> int:
    if args.decode:
        from lm.config import ConfigError
        from lm.infer.compile import check_sizes, run_decode_compile
        check_sizes(args.slots, args.pages, args.page_size)  # before the config is read
        if args.suggest or args.trials != 1:
            raise ConfigError("lm compile --decode takes neither --suggest nor --trials")
        return run_decode_compile(load_config(args), args.topology, slots=args.slots,
                                  pages=args.pages, page_size=args.page_size,
                                  slices=args.slices, json_out=args.json)
    from lm.compile import run_compile
    return run_compile(load_config(args), args.topology, slices=args.slices,
                       do_suggest=args.suggest, max_compiles=args.max_compiles,
                       json_out=args.json, eval_step=not args.train_only, trials=args.trials)


COMMANDS = [Command("compile", "compile the train step for a TPU topology (no TPU needed): "
                    "memory per chip, collectives, FLOPs, estimated step time; --decode: "
                    "the inference engine's decode step's memory",
                    arguments, compile_step, before_jax=host_only)]
