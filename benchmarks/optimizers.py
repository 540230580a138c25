"""Training throughput and optimizer-state bytes per parameter of every update direction
on one config (default configs/bench_5m.py), measured in one process, interleaved: each
round times `--steps` steps of each optimizer in turn (the step `lm bench` times: the
AOT-compiled train step), so machine noise (a shared CPU) hits all alike; the table gives
the median over rounds and the ratio to AdamW of the same rounds.

    python benchmarks/optimizers.py [--config configs/bench_5m.py] [--rounds 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from lm import optim
from lm.config import load_config_file, validate
from lm.data import train_iterator
from lm.train.setup import setup_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench_5m.py")
    p.add_argument("--optimizers", default="adamw,lion,adafactor,muon,sgd_sai")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    base = load_config_file(args.config)
    names = args.optimizers.split(",")
    runs = {}
    for name in names:
        cfg = validate(dataclasses.replace(base, optim=dataclasses.replace(base.optim, name=name)))
        run = setup_run(cfg)
        data = train_iterator(run.cfg.data, run.tokenizer, run.cfg.batch_size, run.cfg.seed)
        batches = [run.pieces.global_batch(next(data)) for _ in range(args.steps + 1)]
        t0 = time.perf_counter()
        step, _ = run.compiled_train_step()
        compile_s = time.perf_counter() - t0
        state = run.pieces.init_state()
        state, m = step(state, batches[0])  # first run outside the timing
        jax.block_until_ready(m)
        _, per_param = optim.describe(run.cfg.optim, run.cfg.model, run.pieces.abstract_state())
        runs[name] = {"step": step, "state": state, "batches": batches[1:],
                      "bytes": per_param, "compile_s": compile_s, "times": []}
        print(f"{name}: compiled in {compile_s:.1f}s, {per_param:.2f} state bytes/param", flush=True)
    tokens = base.batch_size * base.data.seq_len
    for r in range(args.rounds):
        for name in names:
            x = runs[name]
            t0 = time.perf_counter()
            for b in x["batches"]:
                x["state"], m = x["step"](x["state"], b)
            jax.block_until_ready(m)
            x["times"].append((time.perf_counter() - t0) / len(x["batches"]))
    ref = np.array(runs[names[0]]["times"])
    print(f"\n{base.name}: {tokens} tokens/step, {args.rounds} interleaved rounds of "
          f"{args.steps} steps; ratio = median over rounds of (AdamW step time / this step time)")
    print(f"| optimizer | state bytes/param | step ms (median) | tokens/s (median) | tokens/s vs {names[0]} |")
    print("|---|---|---|---|---|")
    for name in names:
        t = np.array(runs[name]["times"])
        print(f"| {name} | {runs[name]['bytes']:.2f} | {1e3 * np.median(t):.1f} | "
              f"{tokens / np.median(t):,.0f} | {np.median(ref / t):.3f} |")


if __name__ == "__main__":
    main()
