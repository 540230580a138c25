"""`lm bench`: steady-state training throughput of a config (never a test)."""

from __future__ import annotations

import resource
import time

import jax
import numpy as np

from lm.config import TrainConfig
from lm.data import load_tokenizer, train_iterator
from lm.hostmem import host_malloc_active
from lm.model import count_params, flops_per_token
from lm.train.mfu import device_peak_flops
from lm.parallel.sharding import per_device_bytes
from lm.train.state import build, with_vocab


def _minor_faults() -> int:
    """Minor page faults of this process so far (the cost lm/hostmem.py removes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(cfg: TrainConfig, steps: int = 20, warmup: int = 3) -> dict:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = with_vocab(cfg, tokenizer.vocab_size)
    pieces = build(cfg)
    data = train_iterator(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    batches = [pieces.global_batch(next(data)) for _ in range(warmup + steps)]
    state = pieces.init_state()
    t0 = time.perf_counter()
    compiled, memory = pieces.compile_train_step()
    compile_s = time.perf_counter() - t0
    for b in batches[:warmup]:
        state, m = compiled(state, b)
    jax.block_until_ready(m)
    times = []
    faults_before = _minor_faults()
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    faults_per_step = (_minor_faults() - faults_before) / steps
    step_time = float(np.median(times))
    tokens = cfg.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, source = device_peak_flops(measure=True)  # same conditions as the step
    tps = tokens / step_time
    counts = count_params(cfg.model)
    result = {
        "config": cfg.name, "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "batch": cfg.batch_size, "seq_len": cfg.data.seq_len,
        "flops_per_token": fpt, "compile_s": compile_s, "step_time_s": step_time,
        "tokens_per_s": tps, "achieved_tflops": fpt * tps / 1e12,
        "peak_tflops": peak / 1e12, "peak_source": source,
        "mfu": fpt * tps / (peak * jax.device_count()),
        "state_bytes_per_device": per_device_bytes(pieces.abstract_state()),
        "temp_bytes": memory.get("temp"),
        "page_faults_per_step": faults_per_step,
    }
    print(f"{cfg.name}: {counts['total']:,} params | batch {cfg.batch_size} x seq "
          f"{cfg.data.seq_len} | compile {compile_s:.1f}s | step {1e3 * step_time:.1f} ms "
          f"(median of {steps}) | {tps:,.0f} tokens/s | {fpt * tps / 1e9:.2f} GFLOP/s | "
          f"MFU {100 * result['mfu']:.1f}% of {peak / 1e9:.1f} GFLOP/s ({source})")
    if jax.default_backend() == "cpu":
        print("host allocator: " + ("step buffers kept in the heap (glibc.malloc.mmap_max=0, "
                                    "synchronous dispatch)" if host_malloc_active() else
                                    "fresh pages every step (see lm/hostmem.py)")
              + f" | {faults_per_step:,.0f} page faults per step")
    if result["temp_bytes"] is not None:
        print(f"memory per device: state {result['state_bytes_per_device'] / 2**20:.1f} MiB, "
              f"compiled step temporaries {result['temp_bytes'] / 2**20:.1f} MiB")
    return result
