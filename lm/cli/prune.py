"""`lm prune RUN --out NEW --method depth|width`: structured pruning of a trained run into
a new run directory (lm/compress/prune.py; docs/pruning.md)."""

from __future__ import annotations

import json

from lm.cli.command import Command


def arguments(p) -> None:
    p.add_argument("run", help="the run directory to prune (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--method", required=True,
                   help="depth (remove attention / MLP sublayers) or width (heads, MLP "
                        "units, embedding channels)")
    p.add_argument("--calib-batches", type=int, default=4,
                   help="validation batches (the run's batch_size rows) the importance "
                        "scores are computed on")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--fraction", type=float, default=None,
                   help="depth: remove this fraction of the sublayers; width: shrink the "
                        "non-embedding parameters by about this fraction")
    depth = p.add_argument_group("depth")
    depth.add_argument("--remove", type=int, default=None, help="sublayers to remove")
    depth.add_argument("--only", choices=("attention", "mlp"), default=None,
                       help="remove only attention or only MLP sublayers")
    width = p.add_argument_group("width (target shape; unset = kept)")
    width.add_argument("--heads", type=int, default=None, help="query heads")
    width.add_argument("--kv-heads", type=int, default=None, help="KV heads (groups)")
    width.add_argument("--ffn", type=int, default=None, help="MLP hidden units (d_ff)")
    width.add_argument("--d-model", type=int, default=None, help="embedding channels")


# Every method's flags (lm/compress/prune.py METHODS says which a method reads; prune()
# refuses the others in one line).
FLAGS = ("remove", "fraction", "only", "heads", "kv_heads", "ffn", "d_model")


def run(args) -> int:
    from lm.compress.prune import prune
    given = {k: getattr(args, k) for k in FLAGS}
    report = prune(args.run, args.out, args.method, calib_batches=args.calib_batches,
                   force=args.force, **given)
    print(json.dumps({k: report[k] for k in (
        "method", "params_before", "params_after", "calib_loss_before", "calib_loss_after")}))
    print(f"pruned {args.run} ({args.method}) into {args.out}")
    return 0


COMMANDS = [Command("prune", "structured pruning (depth: sublayers; width: heads, MLP units, "
                             "embedding channels) of a run into a new run", arguments, run)]
