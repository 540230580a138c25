"""`lm sweep` (run a sweep spec's trials), `lm results` (a table of a sweep's runs), `lm
analyze` (the registered analyses of lm/analysis/analyses.py that apply to it) and `lm
findings` (the findings page of lm/analysis/findings.py)."""

from __future__ import annotations

import shlex

from lm.cli.command import Command


def sweep_arguments(p) -> None:
    p.add_argument("spec", help="Python file with a sweep() function")
    p.add_argument("--workdir", required=True, help="one run dir per trial goes under it")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time")
    p.add_argument("--dry-run", action="store_true", help="print each trial and its command")
    p.add_argument("--smoke", action="store_true", help="the spec's tiny smoke-test version")
    p.add_argument("--launch", default="", metavar="ARGS",
                   help='run each trial through `lm launch ARGS -- train ...`, e.g. '
                        '"local --processes 2" or "slurm --nodes 1 --gpus-per-node 8"')
    p.add_argument("--batch", type=int, default=None, metavar="K",
                   help="train up to K trials that differ only in scalars (LR, seed, warmup, "
                        "weight decay, z-loss, init scale) as one vmapped program "
                        "(default: the spec's Sweep.batch, else 1 = each alone)")


def sweep(args) -> int:
    from lm.sweep.runner import run_sweep
    return run_sweep(args.spec, args.workdir, parallel=args.parallel, dry_run=args.dry_run,
                     smoke=args.smoke, launch=shlex.split(args.launch), batch=args.batch)


def results_arguments(p) -> None:
    p.add_argument("workdir")


def results(args) -> int:
    from lm.analysis.table import results_table
    print(results_table(args.workdir))
    return 0


def analyze_arguments(p) -> None:
    from lm.analysis.analyses import add_options
    p.add_argument("workdir")
    add_options(p)  # each analysis's own options and request flags


def findings_arguments(p) -> None:
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                   help="sweep workdirs whose spec declares PAPER and findings()")
    p.add_argument("--out", default=None,
                   help="write the markdown page here, figures beside it "
                        "(e.g. docs/findings.md); default: print it")


def findings(args) -> int:
    import shlex
    import sys

    from lm.analysis.findings import write
    argv = "lm findings " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "findings" else "lm findings"
    text = write(args.workdirs, args.out, argv)
    print(f"wrote {args.out}" if args.out else text, end="\n" if args.out else "")
    return 0


def analyze(args) -> int:
    from lm.analysis.analyses import analyze
    return analyze(args.workdir, args)


COMMANDS = [
    Command("sweep", "run every trial of a sweep spec (experiments/*.py)", sweep_arguments, sweep),
    Command("results", "a table of the runs under a sweep workdir", results_arguments, results),
    Command("analyze", "LR-sensitivity / scaling-law fits and plots of a sweep",
            analyze_arguments, analyze),
    Command("findings", "the findings page: each sweep's paper, claims, measured result "
            "and verdict", findings_arguments, findings),
]
