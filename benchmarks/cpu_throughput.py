"""Training throughput of variants measured in one run, interleaved round by round so
that machine noise hits them alike: code trees (e.g. a git worktree of an older commit
against this one), XLA CPU flags, environment settings, config overrides, and the PyTorch peer.

    git worktree add /tmp/base 92b131b     # the commit before the throughput work
    python benchmarks/cpu_throughput.py --tree base=/tmp/base --tree now=. \
        --config configs/bench_5m.py --rounds 3
    python benchmarks/cpu_throughput.py --tree jax0.10=/tmp/base@/tmp/venv311/bin/python \
        --tree now=.      # a tree in another interpreter / JAX stack: NAME=PATH@PYTHON
    python benchmarks/cpu_throughput.py --tree now=. --flags onednn=--xla_cpu_use_onednn=true
    python benchmarks/cpu_throughput.py --set dense=model.attention.q_blocks=1
    python benchmarks/cpu_throughput.py --env fresh-pages=LMLAB_HOST_MALLOC=0 \
        --torch /tmp/torchenv/bin/python          # + the peer, as is and with our malloc tunables

Each (tree, setting) pair runs `lm bench` in a fresh process per round; the table gives
the median tokens/s over rounds and the ratio to the first variant. The torch peer
(benchmarks/torch_peer.py, reference shape only) runs in the given interpreter, as is
and with the glibc malloc tunables `lm` gives itself (lm/hostmem.py), so that
neither side has an allocator advantage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lm.hostmem import TUNABLES  # noqa: E402

TOKENS = re.compile(r"\| ([\d,]+) tokens/s \|")
MFU = re.compile(r"MFU ([\d.]+)%")
COMPILE = re.compile(r"compile ([\d.]+)s")


def run_torch(python: str, env_extra: dict, steps: int) -> tuple[float, float, float]:
    script = Path(__file__).resolve().parent / "torch_peer.py"
    out = subprocess.run([python, str(script), "--steps", str(steps), "--json"],
                         env=dict(os.environ, **env_extra), capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(f"torch peer failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.splitlines()[-1])["tokens_per_s"], float("nan"), float("nan")


def run_bench(tree: Path, python: str, flags: str, env_extra: dict, overrides: list[str],
              config: str, steps: int) -> tuple[float, float, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree), **env_extra)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
    out = subprocess.run([python, "-m", "lm.cli", "bench", "--config",
                          str(tree / config), "--steps", str(steps),
                          *[a for o in overrides for a in ("--set", o)]], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    m = TOKENS.search(out.stdout)
    if out.returncode or not m:
        raise SystemExit(f"bench failed in {tree} with {flags!r} {env_extra}: "
                         f"{out.stderr[-1500:]}")
    return (float(m.group(1).replace(",", "")), float(MFU.search(out.stdout).group(1)),
            float(COMPILE.search(out.stdout).group(1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH[@PYTHON]",
                   help="a code tree, run by this interpreter (default: this one)")
    p.add_argument("--flags", action="append", default=[], metavar="NAME=XLA_FLAGS",
                   help="flag variants, each run on every tree ('none' always included)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VAR=VALUE[,VAR=VALUE]",
                   help="environment variants, each run on every tree")
    p.add_argument("--set", action="append", default=[], dest="overrides",
                   metavar="NAME=KEY=VALUE[,KEY=VALUE]", help="config variants, each run on every tree")
    p.add_argument("--torch", metavar="PYTHON",
                   help="also time the PyTorch peer with this interpreter")
    p.add_argument("--config", default="configs/bench_5m.py")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    trees = []
    for item in args.tree or ["now=."]:
        name, spec = item.split("=", 1)
        path, _, python = spec.partition("@")
        trees.append((name, Path(path).resolve(), python or sys.executable))
    settings = [("none", "", {}, [])]
    settings += [(n, f, {}, []) for n, f in (s.split("=", 1) for s in args.flags)]
    for item in args.env:
        name, assignments = item.split("=", 1)
        settings.append((name, "", dict(a.split("=", 1) for a in assignments.split(",")), []))
    for item in args.overrides:
        name, assignments = item.split("=", 1)
        settings.append((name, "", {}, assignments.split(",")))
    variants = [(f"{tn}" + (f"+{sn}" if sn != "none" else ""),
                 lambda tree=tree, py=py, f=f, e=e, o=o: run_bench(tree, py, f, e, o, args.config,
                                                                   args.steps))
                for tn, tree, py in trees for sn, f, e, o in settings]
    if args.torch:
        variants.append(("torch", lambda: run_torch(args.torch, {}, args.steps)))
        variants.append(("torch+heap", lambda: run_torch(
            args.torch, {"GLIBC_TUNABLES": ":".join(TUNABLES)}, args.steps)))
    results: dict[str, list] = {v[0]: [] for v in variants}
    for r in range(args.rounds):
        for name, run in variants:
            results[name].append(run())
            print(f"round {r + 1}: {name}: {results[name][-1][0]:,.0f} tokens/s", flush=True)
    first = statistics.median(x[0] for x in results[variants[0][0]])
    print(f"\n{'variant':<28} {'tokens/s (median)':>18} {'MFU %':>7} {'compile s':>10} {'ratio':>7}")
    for name, runs in results.items():
        tps = statistics.median(x[0] for x in runs)
        print(f"{name:<28} {tps:>18,.0f} {statistics.median(x[1] for x in runs):>7.1f} "
              f"{statistics.median(x[2] for x in runs):>10.1f} {tps / first:>6.2f}x")


if __name__ == "__main__":
    main()
