"""Throughput of the batched engine (lm/infer) against today's loop of lm.sample.generate
(what `lm sample` calls, one prompt at a time), on one random model built in process:
N prompts of mixed length with mixed max_new_tokens, greedy, no stops; the engine at
each batch budget (slots) and the loop, interleaved round by round after a warm-up round
that compiles every program. Prints requests/s and generated tokens/s (median over
rounds) and whether the engine's tokens equal the loop's.

    python benchmarks/engine_throughput.py
    python benchmarks/engine_throughput.py --prompts 256 --batches 1,8,32 --rounds 3 \\
        --d-model 768 --layers 12 --heads 12 --vocab 32000 --max-seq-len 1024
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--new-min", type=int, default=16)
    p.add_argument("--new-max", type=int, default=48)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    args = p.parse_args()

    import jax
    from flax import nnx

    from lm.config import ModelConfig
    from lm.infer import Engine, Request
    from lm.model import Transformer
    from lm.sample import generate

    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                      max_seq_len=args.max_seq_len, init_std=0.1)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = random.Random(0)
    work = [([rng.randrange(3, args.vocab) for _ in range(rng.randint(args.min_len, args.max_len))],
             rng.randint(args.new_min, args.new_max)) for _ in range(args.prompts)]
    batches = [int(b) for b in args.batches.split(",")]
    pages_per_seq = -(-args.max_seq_len // args.page_size)

    def loop():
        return [generate(graphdef, params, prompt, new, temperature=0.0,
                         max_seq_len=args.max_seq_len)[0] for prompt, new in work]

    def engine(slots):
        def run():
            e = Engine(graphdef, params, slots=slots, pages=slots * pages_per_seq + 1,
                       page_size=args.page_size)
            return [r.completions[0].tokens for r in e.generate(
                Request(tuple(prompt), max_new_tokens=new) for prompt, new in work)]
        return run

    sides = {"lm.sample loop": loop, **{f"engine batch {b}": engine(b) for b in batches}}
    times = {name: [] for name in sides}
    outputs = {}
    for r in range(args.rounds + 1):  # round 0: warm-up (compiles), not timed
        for name, fn in sides.items():
            start = time.perf_counter()
            out = fn()
            jax.block_until_ready(out)
            if r:
                times[name].append(time.perf_counter() - start)
            outputs[name] = out
    tokens = sum(len(o) for o in outputs["lm.sample loop"])
    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"vocab={args.vocab} max_seq_len={args.max_seq_len}; {args.prompts} prompts of "
          f"{args.min_len}-{args.max_len} tokens, {args.new_min}-{args.new_max} new each "
          f"({tokens} generated); {jax.devices()[0].platform}, median of {args.rounds} rounds")
    print(f"{'':18} {'seconds':>8} {'requests/s':>11} {'tokens/s':>9} {'same tokens':>12}")
    for name in sides:
        s = statistics.median(times[name])
        same = sum(a == b for a, b in zip(outputs[name], outputs["lm.sample loop"]))
        print(f"{name:18} {s:8.2f} {args.prompts / s:11.2f} {tokens / s:9.1f} "
              f"{same:>5}/{args.prompts}")


if __name__ == "__main__":
    main()
