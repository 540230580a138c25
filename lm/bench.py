"""`lm bench`: steady-state training throughput of a config (never a test).

Two measurements of the same compiled step, interleaved in one process:
  * the bare step: pre-made device batches, one step at a time, waiting for each;
    the median step time gives tokens/s and MFU;
  * the real `lm train` loop (`lm.train.loop.train` into a temporary run dir: prefetch,
    metrics, logging; evaluation and checkpoints pushed past the measured steps,
    TensorBoard off), timed by its own step_time records (the first window is warm-up);
and the loop's overhead over the bare step in %, both as medians of w-step means (the
loop's records are means over its log windows). Rounds alternate bare, loop, bare, loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lm.compress.teacher import with_teacher_width
from lm.post.reference import attach_frozen
from lm.config import TrainConfig
from lm.data import train_iterator
from lm.hostmem import host_malloc_active
from lm.model import count_params, flops_per_token
from lm import optim as optim_lib
from lm.parallel.sharding import per_device_bytes
from lm.compress.quantize import matmul_precision
from lm.train.mfu import device_peak_flops, mfu
from lm.train.setup import RunSetup, setup_run


def _minor_faults() -> int:
    """Minor page faults of this process so far (the cost lm/hostmem.py removes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def loop_window(steps: int) -> int:
    """Steps per timing window: the loop's log interval in the bench, and the blocks of
    bare steps it is compared with."""
    return max(1, steps // 4)


def loop_step_times(run: RunSetup, steps: int) -> list[float]:
    """Step times `lm train` itself records (one per log window of loop_window(steps)
    steps, the first window left out as warm-up) over ~`steps` steps at `run`'s config."""
    from lm.train.loop import train

    window = loop_window(steps)
    total = window * (1 + -(-steps // window))
    far = 10 * total  # evaluation and checkpoints only at the end, after the last window
    cfg = dataclasses.replace(run.cfg, steps=total, log_every=window, eval_every=far,
                              checkpoint_every=far, eval_batches=1, tensorboard=False)
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            code = train(cfg, Path(tmp) / "run", setup=dataclasses.replace(run, cfg=cfg))
        if code:  # diverged, or stopped by a signal
            print(f"lm bench: the training loop stopped with exit code {code}", file=sys.stderr)
            raise SystemExit(code)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl")
                   .read_text().splitlines()]
    return [float(r["step_time"]) for r in records if r["kind"] == "train"][1:]


def bench(cfg: TrainConfig, steps: int = 20, warmup: int = 3, loop_rounds: int = 2) -> dict:
    run = setup_run(with_teacher_width(cfg))
    cfg, pieces = run.cfg, run.pieces
    teacher_params = ()
    attach_frozen(run)  # a distillation teacher / DPO reference: its forward is in the step
    if pieces.teacher is not None:
        teacher_params = (pieces.teacher.load(),)
    if cfg.objective != "lm":  # preference pairs (lm/post/pairs.py)
        from lm.post.pairs import pair_iterator
        data = pair_iterator(cfg.data, run.tokenizer, cfg.batch_size, cfg.data_seed)
    else:
        data = train_iterator(cfg.data, run.tokenizer, cfg.batch_size, cfg.data_seed)
    batches = [pieces.global_batch(next(data)) for _ in range(warmup + steps)]
    state = pieces.init_state()
    t0 = time.perf_counter()
    compiled, memory = run.compiled_train_step()
    compile_s = time.perf_counter() - t0

    def bare_round() -> tuple[list[float], float]:
        """Step times and page faults per step of `steps` steps after `warmup`."""
        nonlocal state
        for b in batches[:warmup]:
            state, m = compiled(state, b, *teacher_params)
        jax.block_until_ready(m)
        times, faults_before = [], _minor_faults()
        for b in batches[warmup:]:
            t0 = time.perf_counter()
            state, m = compiled(state, b, *teacher_params)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        return times, (_minor_faults() - faults_before) / steps

    times, faults_per_step = bare_round()
    bare, loop = [times], []
    if jax.process_count() > 1:  # the loop's run dir would be a different one per process
        loop_rounds = 0
    for r in range(loop_rounds):  # bare, loop, bare, loop, ...: drift hits both alike
        if r:
            bare.append(bare_round()[0])
        loop.append(loop_step_times(run, steps))
    step_time = float(np.median(np.concatenate(bare)))
    tokens = cfg.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    if pieces.teacher is not None:
        fpt += pieces.teacher.forward_flops_per_token()
    peak, source = device_peak_flops(measure=True,  # same conditions as the step
                                     precision=matmul_precision(cfg.quant))
    tps = tokens / step_time
    counts = count_params(cfg.model)
    result = {
        "config": cfg.name, "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "batch": cfg.batch_size, "seq_len": cfg.data.seq_len,
        "flops_per_token": fpt, "compile_s": compile_s, "step_time_s": step_time,
        "tokens_per_s": tps, "achieved_tflops": fpt * tps / 1e12,
        "peak_tflops": peak / 1e12, "peak_source": source,
        "mfu": mfu(fpt, tps, peak, jax.device_count()),
        "state_bytes_per_device": per_device_bytes(pieces.abstract_state()),
        "temp_bytes": memory.get("temp"),
        "page_faults_per_step": faults_per_step,
        "optimizer": cfg.optim.name,
    }
    optim_line, result["optimizer_state_bytes_per_param"] = optim_lib.describe(
        cfg.optim, cfg.model, pieces.abstract_state())
    print(optim_line)
    print(f"{cfg.name}: {counts['total']:,} params | batch {cfg.batch_size} x seq "
          f"{cfg.data.seq_len} | compile {compile_s:.1f}s | step {1e3 * step_time:.1f} ms "
          f"(median of {steps * len(bare)}) | {tps:,.0f} tokens/s | {fpt * tps / 1e9:.2f} GFLOP/s | "
          f"MFU {100 * result['mfu']:.1f}% of {peak / 1e9:.1f} GFLOP/s ({source})")
    if loop:
        # Like with like: the loop's records are mean step times over windows of w steps,
        # so the bare steps are compared in blocks of w too (medians of block means).
        w = loop_window(steps)
        blocks = [[float(np.mean(b[i:i + w])) for i in range(0, len(b) - w + 1, w)]
                  for b in bare]
        bare_time = float(np.median(np.concatenate(blocks)))
        loop_time = float(np.median(np.concatenate(loop)))
        result.update(bare_window_step_time_s=bare_time, loop_step_time_s=loop_time,
                      loop_overhead=loop_time / bare_time - 1,
                      rounds=[{"bare_s": float(np.median(b)), "loop_s": float(np.median(lp))}
                              for b, lp in zip(blocks, loop)])
        per_round = ", ".join(f"{1e3 * r['bare_s']:.1f}/{1e3 * r['loop_s']:.1f}"
                              for r in result["rounds"])
        print(f"lm train loop: step {1e3 * loop_time:.1f} ms vs bare step {1e3 * bare_time:.1f} "
              f"ms (medians of {w}-step means; {len(loop)} rounds bare, loop, ...): overhead "
              f"{100 * result['loop_overhead']:+.1f}% (bare/loop ms per round: {per_round})")
    if jax.default_backend() == "cpu":
        print("host allocator: " + ("step buffers kept in the heap (glibc.malloc.mmap_max=0, "
                                    "synchronous dispatch)" if host_malloc_active() else
                                    "fresh pages every step (see lm/hostmem.py)")
              + f" | {faults_per_step:,.0f} page faults per step")
    if result["temp_bytes"] is not None:
        print(f"memory per device: state {result['state_bytes_per_device'] / 2**20:.1f} MiB, "
              f"compiled step temporaries {result['temp_bytes'] / 2**20:.1f} MiB")
    return result
