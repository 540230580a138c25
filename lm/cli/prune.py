"""`lm prune RUN --out NEW --method 2:4`: one-shot semi-structured pruning of a run into a
new run dir (lm/compress/sparsity.py prune_2_4), which `lm train --init-from NEW` heals
with its masks fixed."""

from __future__ import annotations

from lm.cli.command import Command


def arguments(p) -> None:
    p.add_argument("run", help="the run directory to prune (its newest checkpoint)")
    p.add_argument("--out", required=True,
                   help="the new run directory (must not exist, or be empty)")
    p.add_argument("--method", required=True, metavar="N:M",
                   help="2:4 (any N:M with M dividing each target's fan-in): keep N of "
                        "every M weights along the fan-in")
    p.add_argument("--score", default="magnitude",
                   help="magnitude (|w|) or obs (w^2 x the empirical Fisher's diagonal, "
                        "from calibration batches)")
    p.add_argument("--targets", default="",
                   help="comma-separated globs over param paths (default: the run's "
                        "sparsity.targets: every block's attention and MLP projections)")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="validation batches for the obs score and the before/after loss")


def run(args) -> int:
    from lm.compress.sparsity import parse_pattern, prune_2_4
    parse_pattern(args.method)
    report = prune_2_4(args.run, args.out, score=args.score, targets=args.targets or None,
                       calib_batches=args.calib_batches, pattern=args.method)
    mean = sum(report["sparsity"].values()) / len(report["sparsity"])
    print(f"pruned {args.run} ({args.method}, {args.score}) into {args.out}: "
          f"{len(report['sparsity'])} matrices, {mean:.0%} zeros; calibration loss "
          f"{report['calib_loss_before']:.4f} -> {report['calib_loss_after']:.4f}")
    return 0


COMMANDS = [Command("prune", "one-shot N:M (2:4) sparsity of a run -> a new run dir",
                    arguments, run)]
