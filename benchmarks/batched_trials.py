"""Batched vs one-by-one trials: `lm sweep --batch K` against `--batch 1` on the
lr_sensitivity experiment's shape, interleaved in one run (the machine is shared and
noisy: compare the ratios of one run, not figures of separate runs).

    python benchmarks/batched_trials.py [--width 64] [--trials 8] [--steps 100] [--rounds 2]

For each mode and round it prints the sweep's wall time (what a user waits: process
start-up and compiles included) and the trials' steady-state tokens/s per trial (the
median of the logged tokens_per_s after the first log, per trial, then the mean over
trials), and at the end the ratios batched / one-by-one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPEC = '''
import dataclasses
from lm.config import exec_python_file
from lm.sweep import Grid, log_grid

def sweep():
    base = exec_python_file({experiment!r}, "sweep spec").sweep()
    widths = {{k: v for k, v in base.sizes.items() if v["model.d_model"] == {width}}}
    lrs = log_grid(1e-3, 1e-1, {n_lrs})
    return dataclasses.replace(
        base, sizes=widths, arms={{"baseline": {{}}}}, axes=[Grid("optim.lr", lrs)],
        seeds={seeds}, overrides=dict(base.overrides, steps={steps}, eval_every={steps},
                                      checkpoint_every={steps}, log_every=10,
                                      **{{"optim.warmup_steps": 5}}))
'''


def per_trial_tokens_per_s(workdir: Path) -> float:
    rates = []
    for metrics in workdir.glob("*/metrics.jsonl"):
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
        steady = [r["tokens_per_s"] for r in recs[1:]]
        if steady:
            rates.append(statistics.median(steady))
    return statistics.mean(rates) if rates else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--trials", type=int, default=8, help="LRs x 2 seeds")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-batched-bench-"))
    spec = tmp / "spec.py"
    spec.write_text(SPEC.format(experiment=str(ROOT / "experiments" / "lr_sensitivity.py"),
                                width=args.width, n_lrs=args.trials // 2, seeds=2,
                                steps=args.steps))
    results = {"one-by-one": [], "batched": []}
    print(f"{args.trials} trials, width {args.width}, {args.steps} steps each "
          f"(lr_sensitivity shape), {args.rounds} interleaved rounds")
    for r in range(args.rounds):
        for mode, batch in (("one-by-one", 1), ("batched", args.trials)):
            wd = tmp / f"{mode}-{r}"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "lm.cli", "sweep", str(spec),
                                   "--workdir", str(wd), "--batch", str(batch)],
                                  capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            if proc.returncode:
                sys.exit(f"{mode} sweep failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            tps = per_trial_tokens_per_s(wd)
            results[mode].append((wall, tps))
            print(f"round {r}  {mode:>10}: wall {wall:7.1f} s for the {args.trials} trials | "
                  f"{tps:9,.0f} tokens/s per trial (steady state) | "
                  f"{tps * (args.trials if batch > 1 else 1):9,.0f} tokens/s on the machine",
                  flush=True)
    walls = {m: statistics.mean(w for w, _ in v) for m, v in results.items()}
    rates = {m: statistics.mean(t for _, t in v) for m, v in results.items()}
    print(f"batched / one-by-one: wall time x{walls['one-by-one'] / walls['batched']:.2f} "
          f"faster; steady-state tokens/s per trial x{rates['batched'] / rates['one-by-one']:.2f}; "
          f"machine throughput x{args.trials * rates['batched'] / rates['one-by-one']:.2f}")


if __name__ == "__main__":
    main()
