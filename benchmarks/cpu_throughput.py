"""Training throughput of variants measured in one run, interleaved round by round so
that machine noise hits them alike: code trees (e.g. a git worktree of an older commit
against this one) and XLA CPU flags.

    git worktree add /tmp/base 92b131b     # the commit before the throughput work
    python benchmarks/cpu_throughput.py --tree base=/tmp/base --tree now=. \
        --config configs/bench_5m.py --rounds 3
    python benchmarks/cpu_throughput.py --tree now=. --flags onednn=--xla_cpu_use_onednn=true

Each (tree, flags) pair runs `lm bench` in a fresh process per round; the table gives the
median tokens/s over rounds and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

TOKENS = re.compile(r"\| ([\d,]+) tokens/s \|")
MFU = re.compile(r"MFU ([\d.]+)%")
COMPILE = re.compile(r"compile ([\d.]+)s")


def run_bench(tree: Path, flags: str, config: str, steps: int) -> tuple[float, float, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree))
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
    out = subprocess.run([sys.executable, "-m", "lm.cli", "bench", "--config",
                          str(tree / config), "--steps", str(steps)], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    m = TOKENS.search(out.stdout)
    if out.returncode or not m:
        raise SystemExit(f"bench failed in {tree} with {flags!r}: {out.stderr[-1500:]}")
    return (float(m.group(1).replace(",", "")), float(MFU.search(out.stdout).group(1)),
            float(COMPILE.search(out.stdout).group(1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--flags", action="append", default=[], metavar="NAME=XLA_FLAGS",
                   help="flag variants, each run on every tree ('none' always included)")
    p.add_argument("--config", default="configs/bench_5m.py")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    trees = [(n, Path(t).resolve()) for n, t in (s.split("=", 1) for s in args.tree or ["now=."])]
    flag_sets = [("none", "")] + [tuple(s.split("=", 1)) for s in args.flags]
    variants = [(f"{tn}" + (f"+{fn}" if fn != "none" else ""), tree, flags)
                for tn, tree in trees for fn, flags in flag_sets]
    results: dict[str, list] = {v[0]: [] for v in variants}
    for r in range(args.rounds):
        for name, tree, flags in variants:
            results[name].append(run_bench(tree, flags, args.config, args.steps))
            print(f"round {r + 1}: {name}: {results[name][-1][0]:,.0f} tokens/s", flush=True)
    first = statistics.median(x[0] for x in results[variants[0][0]])
    print(f"\n{'variant':<28} {'tokens/s (median)':>18} {'MFU %':>7} {'compile s':>10} {'ratio':>7}")
    for name, runs in results.items():
        tps = statistics.median(x[0] for x in runs)
        print(f"{name:<28} {tps:>18,.0f} {statistics.median(x[1] for x in runs):>7.1f} "
              f"{statistics.median(x[2] for x in runs):>10.1f} {tps / first:>6.2f}x")


if __name__ == "__main__":
    main()
