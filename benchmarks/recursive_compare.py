"""Relaxed recursive transformers against their untied parent: from one trained run,
models whose layers share K blocks (averaged from the parent's layers), with per-layer
LoRA relaxations of several ranks (SVD of each layer's residual), each uptrained for
--steps; the parent is trained on for the same steps as the reference, and a 2-layer
untied model (the size of two blocks) is trained from scratch for --steps and for the
parent's steps + --steps (the default config's schedule over those steps).
Prints a markdown table: stored parameters, FLOPs per token, validation loss at the
start (eval @ 0, right after tying) and after uptraining, tokens/s.

    python benchmarks/recursive_compare.py --workdir /tmp/rrcmp --base-steps 800 --steps 200

The base is the default config (`lm train`, its step count cut by --base-steps), or
--base RUN. Every arm runs with the same data, LR schedule and seed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from finetune_compare import lm, sets

ARMS = [  # name, overrides
    ("untied parent (trained on)", []),
    ("K=2 cycle, strict", ["model.recursion.blocks=2"]),
    ("K=2 cycle, r=8", ["model.recursion.blocks=2", "model.recursion.relax_rank=8"]),
    ("K=2 cycle, r=32", ["model.recursion.blocks=2", "model.recursion.relax_rank=32"]),
    ("K=2 sequence, r=8", ["model.recursion.blocks=2", "model.recursion.order=sequence",
                           "model.recursion.relax_rank=8"]),
    ("K=1, strict", ["model.recursion.blocks=1"]),
    ("K=1, r=8", ["model.recursion.blocks=1", "model.recursion.relax_rank=8"]),
    ("K=1, r=32", ["model.recursion.blocks=1", "model.recursion.relax_rank=32"]),
]


def evals(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
            if r.get("kind") == "eval"}


def completed(run: Path) -> bool:
    return (run / "summary.json").is_file() and json.loads(
        (run / "summary.json").read_text())["status"] == "completed"


def train_once(run: Path, *args: str) -> str:
    """`lm train ... --run-dir run` unless it completed before; its stdout (kept in
    run.log beside it: the start-up lines hold the counts)."""
    log = run.with_suffix(".log")
    if not completed(run):
        log.write_text(lm("train", "--run-dir", str(run), *args))
    return log.read_text()


def counts_and_speed(run: Path, stdout: str) -> list[str]:
    """[params, non-embedding params, MFLOP/token] from the start-up line, and the mean
    tokens/s after the first (compiling) log interval."""
    counts = re.search(r"([\d,]+) params \(([\d,]+) non-embedding.*?([\d.]+) MFLOP/token",
                       stdout)
    speeds = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if r.get("kind") == "train" and "tokens_per_s" in r][1:]
    return [*counts.groups(), f"{sum(speeds) / max(len(speeds), 1):,.0f}"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--base", default="", help="a trained run (default: train one)")
    p.add_argument("--base-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else work / "base"
    if not args.base and not completed(base):
        lm("train", "--run-dir", str(base), *sets(f"steps={args.base_steps}"))
    base_summary = json.loads((base / "summary.json").read_text())
    common = sets(f"steps={args.steps}", f"eval_every={args.steps}", "optim.schedule=cosine",
                  "optim.warmup_steps=20", f"optim.lr={args.lr}", "log_every=20", "seed=1")
    rows = []
    for i, (name, extra) in enumerate(ARMS):
        run = work / f"arm{i}"
        out = train_once(run, "--init-from", str(base), *common, *sets(*extra))
        ev = evals(run)
        *counts, speed = counts_and_speed(run, out)
        rows.append([name, *counts, f"{ev[0]:.4f}", f"{ev[args.steps]:.4f}", speed])
    # Same-size baselines: an untied model with as many layers as K=2 has blocks, trained
    # from scratch for as many steps as the uptraining, and on as many tokens as the
    # parent and the uptraining together.
    for steps in (args.steps, base_summary["steps"] + args.steps):
        small = work / f"small{steps}"
        out = train_once(small, *sets(f"steps={steps}", f"eval_every={steps}",
                                      "model.n_layers=2"))
        *counts, speed = counts_and_speed(small, out)
        rows.append([f"2-layer untied, from scratch ({steps} steps)", *counts, "—",
                     f"{evals(small)[steps]:.4f}", speed])
    print(f"base: {base}, {base_summary['steps']} steps, final val loss "
          f"{base_summary['final_val_loss']:.4f}, {base_summary['params']:,} params; each arm "
          f"+{args.steps} steps, LR {args.lr} cosine")
    print("| model | params | non-embedding | MFLOP/token | val loss @ 0 | val loss @ "
          f"{args.steps} | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
