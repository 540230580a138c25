"""`lm prune RUN --out NEW --method depth|width|N:M`: a trained run made smaller, into a
new run directory. depth / width: structured pruning (lm/compress/prune.py;
docs/pruning.md); N:M (2:4): one-shot semi-structured sparsity whose masks the new run
keeps (lm/compress/sparsity.py; docs/sparsity.md). `lm train --init-from NEW` heals
either (with `--distill-from RUN`: from the unpruned parent)."""

from __future__ import annotations

import json

from lm.cli.command import Command


def arguments(p) -> None:
    p.add_argument("run", help="the run directory to prune (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--method", required=True,
                   help="depth (remove attention / MLP sublayers), width (heads, MLP "
                        "units, embedding channels) or N:M, e.g. 2:4 (keep N of every M "
                        "weights along each target's fan-in)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="validation batches (the run's batch_size rows) the scores and the "
                        "before/after losses use (default: 4 for depth / width, 8 for N:M)")
    p.add_argument("--force", action="store_true",
                   help="depth / width: replace --out if it exists (once the new run is "
                        "complete)")
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
    sparse = p.add_argument_group("N:M")
    sparse.add_argument("--score", default=None,
                        help="magnitude (|w|, the default) or obs (w^2 x the empirical "
                             "Fisher's diagonal, from calibration batches)")
    sparse.add_argument("--targets", default=None,
                        help="comma-separated globs over param paths (default: the run's "
                             "sparsity.targets: every block's attention and MLP projections)")


# The structured methods' flags (lm/compress/prune.py METHODS says which a method reads;
# prune() refuses the others in one line), and N:M's.
FLAGS = ("remove", "fraction", "only", "heads", "kv_heads", "ffn", "d_model")
SPARSE_FLAGS = ("score", "targets")


def _refuse_flags(method: str, args, flags) -> None:
    from lm.errors import ConfigError
    for k in flags:
        if getattr(args, k) not in (None, False):
            raise ConfigError(f"lm prune --method {method}: --{k.replace('_', '-')} is "
                              "not one of its options")


def run(args) -> int:
    if ":" in args.method:
        return _sparse(args)
    from lm.compress.prune import prune
    _refuse_flags(args.method, args, SPARSE_FLAGS)
    given = {k: getattr(args, k) for k in FLAGS}
    report = prune(args.run, args.out, args.method, force=args.force,
                   calib_batches=4 if args.calib_batches is None else args.calib_batches,
                   **given)
    print(json.dumps({k: report[k] for k in (
        "method", "params_before", "params_after", "calib_loss_before", "calib_loss_after")}))
    print(f"pruned {args.run} ({args.method}) into {args.out}")
    return 0


def _sparse(args) -> int:
    from lm.compress.sparsity import parse_pattern
    from lm.compress.sparsity_prune import prune_2_4
    parse_pattern(args.method)
    _refuse_flags(args.method, args, (*FLAGS, "force"))
    score = args.score or "magnitude"
    report = prune_2_4(args.run, args.out, score=score, targets=args.targets or None,
                       calib_batches=8 if args.calib_batches is None else args.calib_batches,
                       pattern=args.method)
    mean = sum(report["sparsity"].values()) / len(report["sparsity"])
    print(f"pruned {args.run} ({args.method}, {score}) into {args.out}: "
          f"{len(report['sparsity'])} matrices, {mean:.0%} zeros; calibration loss "
          f"{report['calib_loss_before']:.4f} -> {report['calib_loss_after']:.4f}")
    return 0


COMMANDS = [Command("prune", "make a trained run smaller into a new run: depth (sublayers), "
                             "width (heads, MLP units, embedding channels) or N:M sparsity",
                    arguments, run)]
