"""MoE layer against a dense MLP of equal active FLOPs: forward + backward tokens/s.

The dense MLP is `ratio x d_model` wide; the MoE layer routes each token to `top_k`
experts of `ratio / top_k x d_model`, so the expert matmuls do the same FLOPs per token.
What the MoE pays on top is routing (router matmul, top-k), the sort by expert, the
gathers / scatters, and the grouped matmul's efficiency against one dense GEMM. Timed
interleaved (round-robin, median of rounds) so machine noise hits both alike.

    python benchmarks/moe_layer.py                              # d_model 256, 8192 tokens
    python benchmarks/moe_layer.py --experts 4 8 16 --top-k 2 --d-model 512
    python benchmarks/moe_layer.py --grouped --experts 4 8 16   # the grouped matmul alone:
        # each implementation (kernels/grouped_matmul.py) against one dense matmul of the
        # same rows, [16384, 256] x [256, 512], groups of random sizes
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig
from lm.model.mixers.mlp import MLP, MLPConfig
from lm.model.mixers.moe import MoE, MoEConfig


def step_fn(layer):
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        out = nnx.merge(graphdef, state)(x)
        y = out[0] if isinstance(out, tuple) else out
        return jnp.sum(y * y)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda x: grad(state, x)


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each (warmed-up) fn, timed round-robin."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(ts)[rounds // 2] for k, ts in times.items()}


def grouped(args) -> None:
    import numpy as np

    from lm.kernels.grouped_matmul import grouped_matmul
    m, k, n = 16384, 256, 512
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k))
    w1 = jax.random.normal(jax.random.PRNGKey(1), (k, n))
    dense = jax.jit(lambda x, w: x @ w)
    fns = {"dense": lambda: dense(x, w1)}
    for g in args.experts:
        w = jax.random.normal(jax.random.PRNGKey(1), (g, k, n))
        sizes = jnp.asarray(np.random.RandomState(g).multinomial(m, [1 / g] * g), jnp.int32)
        for impl in ("ragged", "blocked"):
            f = jax.jit(lambda x, w, s, impl=impl: grouped_matmul(x, w, s, impl))
            fns[f"{impl} {g} groups"] = lambda f=f, w=w, s=sizes: f(x, w, s)
    t = interleaved(fns, args.rounds)
    print(f"{jax.devices()[0].platform}: [{m}, {k}] x [{k}, {n}], median of {args.rounds} "
          "interleaved rounds")
    for name, s in t.items():
        print(f"{name:<20}{1e3 * s:>9.1f} ms{s / t['dense']:>8.2f}x dense")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ratio", type=float, default=4.0, help="dense MLP width / d_model")
    p.add_argument("--experts", type=int, nargs="+", default=[8])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--grouped", action="store_true", help="time the grouped matmul alone")
    args = p.parse_args()
    if args.grouped:
        return grouped(args)
    d = args.d_model
    x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens // 512, 512, d))
    base = ModelConfig(d_model=d, n_layers=2, n_heads=4, vocab_size=256,
                       mlp=MLPConfig(ratio=args.ratio))
    fns = {"dense MLP": step_fn(MLP(base, nnx.Rngs(0)))}
    for e in args.experts:
        cfg = ModelConfig(d_model=d, n_layers=2, n_heads=4, vocab_size=256, channel_pattern="e",
                          moe=MoEConfig(n_experts=e, top_k=args.top_k,
                                        ratio=args.ratio / args.top_k))
        fns[f"MoE {e} experts top-{args.top_k}"] = step_fn(MoE(cfg, nnx.Rngs(0)))
    t = interleaved({k: lambda f=f: f(x) for k, f in fns.items()}, args.rounds)
    flops = 6 * 2 * d * args.ratio * d * args.tokens  # fwd + bwd of the two matmuls
    print(f"{jax.devices()[0].platform}, d_model {d}, {args.tokens} tokens, dense width "
          f"{args.ratio:g} x d_model; fwd+bwd, median of {args.rounds} interleaved rounds")
    print(f"{'layer':<28}{'ms':>9}{'tokens/s':>12}{'GFLOP/s':>10}{'vs dense':>10}")
    for k, s in t.items():
        print(f"{k:<28}{1e3 * s:>9.1f}{args.tokens / s:>12,.0f}{flops / s / 1e9:>10.1f}"
              f"{t['dense MLP'] / s:>9.2f}x")


if __name__ == "__main__":
    main()
