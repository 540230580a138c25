"""`lm linearize RUN --to retention|mamba2 --out NEW`: a trained transformer's attention
layers replaced by scan mixers trained to imitate them (attention transfer), written as
an ordinary run (lm/compress/linearize.py; docs/linearization.md)."""

from __future__ import annotations

from lm.cli.command import Command, overrides_option


def arguments(p) -> None:
    p.add_argument("run", help="the trained run to linearize (its newest checkpoint)")
    p.add_argument("--to", required=True, metavar="MIXER",
                   help="the scan mixer that replaces attention: retention | mamba2")
    p.add_argument("--out", required=True, help="the new run directory (must not exist or "
                                                "be empty)")
    p.add_argument("--layers", default="", help="0-based attention layers to linearize, "
                   "e.g. 1,3 (default: every attention layer)")
    p.add_argument("--keep-window", type=int, default=0, metavar="W",
                   help="retention: keep softmax attention over the last W tokens beside the "
                        "linear part (LoLCATs' hybrid; model.retention.window); 0 = off")
    p.add_argument("--transfer-steps", type=int, default=200,
                   help="attention-transfer steps (0 = the construction alone)")
    p.add_argument("--lr", type=float, default=0.0, help="attention-transfer peak LR (adamw, "
                   "warmup then cosine; 0 = 1e-2 with --train new, 1e-3 with all)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="calibration rows per step (0 = the run's batch_size)")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="validation batches for the MSE and loss report")
    p.add_argument("--train", default="", metavar="WHICH",
                   help="the new mixers' params attention transfer trains: new = those not "
                        "taken from the attention (LoLCATs: retention's feature maps; the "
                        "default for retention), all = every one (the default for mamba2)")
    p.add_argument("--seed", type=int, default=0, help="calibration order and fresh params")
    overrides_option(p, "a knob of the new model, e.g. --set model.retention.decay=none or "
                        "--set model.retention.feature_map=elu (model.* only)")


def run(args) -> int:
    from lm.compress.linearize import linearize
    linearize(args.run, args.out, args.to, layers=args.layers, steps=args.transfer_steps,
              lr=args.lr, batch_size=args.batch_size, eval_batches=args.eval_batches,
              overrides=args.overrides, seed=args.seed, train=args.train,
              keep_window=args.keep_window,
              log=lambda line: print(line, flush=True))
    return 0


COMMANDS = [Command("linearize", "replace attention layers by trained scan mixers "
                    "(attention transfer)", arguments, run)]
