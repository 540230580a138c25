"""Kernel benchmark: flash attention against jax.nn.dot_product_attention (xla, and
cudnn on NVIDIA GPUs) in TFLOP/s and % of the device peak; the chunked scan against the
`lax.scan` and `lax.associative_scan` references in time and GB/s.

    python benchmarks/kernel_bench.py                      # seq 1k-16k, bf16, head dim 64/128
    python benchmarks/kernel_bench.py --seqs 256 512 --tokens 2048 --head-dims 32 --dtype float32
                                                      # a CPU-sized run (pallas = interpret)
    python benchmarks/kernel_bench.py --only scan      # on a TPU: pallas-tpu = kernels/scan/tpu.py

Each case holds `--tokens` tokens (batch = tokens / seq) and `--width` query channels
(heads = width / head_dim). Attention FLOPs count the two matmuls, 4 B H T^2 D, halved
for causal masking; `fwd+bwd` counts 3.5x the forward (the backward recomputes the
scores). Scan bytes are the reads of q, k, v, decay and the write of the output. On CPU
the Pallas kernels run in interpret mode: their numbers measure the interpreter, not the
kernel; the XLA chunked scan is the CPU implementation.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lm.kernels.attention import flash_attention
from lm.kernels.dispatch import compiling_for
from lm.kernels.scan import linear_scan, scan_associative, scan_reference
from lm.train.mfu import device_peak_flops


def timed(fn, *args, repeats: int) -> float:
    """Median seconds per call of a jitted fn (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_impls(backend: str) -> dict:
    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    impls = {"pallas": lambda q, k, v: flash_attention(q, k, v, causal=True,
                                                       block_q=128, block_k=64),
             "xla": xla}
    if backend == "gpu":
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    return impls


def bench_attention(args, dtype, peak: float) -> None:
    print(f"\nattention (causal, {jnp.dtype(dtype).name}): TFLOP/s, % of peak; "
          "fwd and fwd+bwd")
    print(f"{'seq':>6} {'hd':>4} {'impl':>7} {'fwd ms':>9} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'f+b ms':>9} {'TFLOP/s':>8} {'%peak':>6}")
    for hd in args.head_dims:
        for t in args.seqs:
            b, h = max(1, args.tokens // t), max(1, args.width // hd)
            ks = jax.random.split(jax.random.PRNGKey(0), 3)
            q, k, v = (jax.random.normal(key, (b, t, h, hd), dtype) for key in ks)
            flops = 4 * b * h * t * t * hd / 2
            for name, fn in attention_impls(jax.default_backend()).items():
                fwd = jax.jit(fn)
                grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(
                    fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
                try:
                    tf = timed(fwd, q, k, v, repeats=args.repeats)
                    tb = timed(grad, q, k, v, repeats=args.repeats) if args.backward else float("nan")
                except Exception as e:  # noqa: BLE001 - one failing impl must not end the table
                    print(f"{t:>6} {hd:>4} {name:>7}  failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]}")
                    continue
                rf, rb = flops / tf / 1e12, 3.5 * flops / tb / 1e12
                print(f"{t:>6} {hd:>4} {name:>7} {tf * 1e3:>9.3f} {rf:>8.3g} "
                      f"{100 * rf * 1e12 / peak:>5.1f}% {tb * 1e3:>9.3f} {rb:>8.3g} "
                      f"{100 * rb * 1e12 / peak:>5.1f}%")


def tpu_interpreted(chunk: int):
    def fn(*x):
        with compiling_for("tpu"):
            return linear_scan(*x, chunk_size=chunk, impl="pallas", interpret=True)
    return fn


def bench_scan(args, dtype) -> None:
    pallas_name = {"tpu": "pallas-tpu", "gpu": "pallas-gpu"}.get(jax.default_backend(), "pallas")
    print(f"\nlinear scan ({jnp.dtype(dtype).name}, Dk = Dv = head dim): ms, GB/s, "
          "speed-up over lax.associative_scan (forward); fwd+bwd ms")
    print(f"{'seq':>6} {'hd':>4} {'impl':>12} {'ms':>9} {'GB/s':>8} {'vs assoc':>9} "
          f"{'f+b ms':>9}")
    for hd in args.head_dims:
        for t in args.seqs:
            b, h = max(1, args.tokens // t), max(1, args.width // hd)
            ks = jax.random.split(jax.random.PRNGKey(1), 4)
            q = jax.random.normal(ks[0], (b, t, h, hd), dtype)
            k = (jax.random.normal(ks[1], (b, t, h, hd)) / hd ** 0.5).astype(dtype)
            v = jax.random.normal(ks[2], (b, t, h, hd), dtype)
            a = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)))
            nbytes = (4 * b * t * h * hd) * jnp.dtype(dtype).itemsize + a.size * 4
            impls = {
                # On a TPU this is the Mosaic kernel (kernels/scan/tpu.py), on a GPU the
                # Triton-style one, on CPU the latter in interpret mode.
                pallas_name: lambda *x: linear_scan(*x, chunk_size=args.chunk, impl="pallas"),
                "xla-chunked": lambda *x: linear_scan(*x, chunk_size=args.chunk, impl="xla"),
                "lax.scan": scan_reference,
                "associative": scan_associative,
            }
            if args.tpu_interpret:  # the TPU kernel's code path on CPU (no timing value)
                impls["tpu-interp"] = tpu_interpreted(args.chunk)
            times, backward = {}, {}
            for name, fn in impls.items():
                try:
                    times[name] = timed(jax.jit(fn), q, k, v, a, repeats=args.repeats)
                    if args.backward:  # gradients of q, k, v and the decay
                        grad = jax.jit(jax.grad(lambda *x, fn=fn: jnp.sum(
                            fn(*x)[0].astype(jnp.float32)), argnums=(0, 1, 2, 3)))
                        backward[name] = timed(grad, q, k, v, a, repeats=args.repeats)
                except Exception as e:  # noqa: BLE001 - e.g. associative_scan out of memory
                    print(f"{t:>6} {hd:>4} {name:>12}  failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]}")
            for name, sec in times.items():
                ratio = times.get("associative", float("nan")) / sec
                print(f"{t:>6} {hd:>4} {name:>12} {sec * 1e3:>9.3f} {nbytes / sec / 1e9:>8.3g} "
                      f"{ratio:>8.2f}x {backward.get(name, float('nan')) * 1e3:>9.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch x seq per case")
    p.add_argument("--width", type=int, default=2048, help="heads x head_dim per case")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--chunk", type=int, default=64, help="scan chunk length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-backward", dest="backward", action="store_false")
    p.add_argument("--only", choices=["attention", "scan"], default=None)
    p.add_argument("--tpu-interpret", action="store_true",
                   help="also run the TPU scan kernel in TPU interpret mode (a CPU check "
                        "that its path runs; the time measures the interpreter)")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    peak, source = device_peak_flops()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"peak {peak / 1e12:.1f} TFLOP/s ({source})")
    if args.only in (None, "attention"):
        bench_attention(args, dtype, peak)
    if args.only in (None, "scan"):
        bench_scan(args, dtype)


if __name__ == "__main__":
    main()
