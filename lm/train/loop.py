"""The training loop: resume-or-start, step, log, evaluate, checkpoint, summarise.

Exit codes: 0 done; 3 diverged (non-finite loss; the last good checkpoint is kept);
128 + signal number when stopped by SIGTERM / SIGINT after a final checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.data import eval_batches, load_tokenizer, target_bytes, train_iterator
from lm.model import count_params, flops_per_token, logit_layers
from lm.train.checkpoint import Checkpointer
from lm.train.metrics import MetricsSink, Progress
from lm.train.mfu import device_peak_flops
from lm.parallel.sharding import per_device_bytes
from lm.train.state import build, with_vocab

EXIT_DIVERGED = 3

# Fields that may change between a run and its resumption: they steer bookkeeping,
# not the computation, so the resumed run still reproduces the uninterrupted one.
OPERATIONAL_FIELDS = {"log_every", "eval_every", "eval_batches", "checkpoint_every",
                      "keep_checkpoints", "tensorboard", "name"}


def prepare_run(cfg: TrainConfig, run_dir: Path):
    """Everything that can fail on user input, before anything is written."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = config_lib.validate(with_vocab(cfg, tokenizer.vocab_size))
    pieces = build(cfg)  # checks the mesh against the devices and the shapes
    saved = run_dir / "config.json"
    if saved.exists():
        previous = config_lib.from_json(saved.read_text())
        diff = [d for d in config_lib.config_diff(previous, cfg)
                if d.split(":")[0] not in OPERATIONAL_FIELDS]
        if diff:
            raise ConfigError(f"{run_dir} holds a run with a different config "
                              f"({'; '.join(diff[:3])}); use another --run-dir")
    return cfg, tokenizer, pieces


def write_json(path: Path, obj: dict) -> None:
    if jax.process_index() != 0:  # one writer per run dir (every process holds the same)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def evaluate(pieces, eval_step, params, batches, tokenizer) -> dict:
    nll_sum, count, nbytes = 0.0, 0.0, 0.0
    for batch in batches:
        s, c = eval_step(params, pieces.replicated_batch(batch))
        nll_sum += float(s)
        count += float(c)
        nbytes += float(np.sum(target_bytes(batch, tokenizer)))
    return {"loss": nll_sum / max(count, 1.0),
            "bpb": nll_sum / math.log(2) / max(nbytes, 1.0)}


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def agree(self) -> None:
        """All processes must stop after the same step (else one checkpoints while the
        others wait in the next step's collectives): take the max over processes."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            self.signum = int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _inject_fault(step: int) -> None:
    """LMLAB_FAULT=sigterm@N | sigkill@N: signal this process after step N (tests use it
    to kill a run at a known step)."""
    spec = os.environ.get("LMLAB_FAULT", "")
    if not spec:
        return
    kind, _, at = spec.partition("@")
    if int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)


def train(cfg: TrainConfig, run_dir: str | Path) -> int:
    run_dir = Path(run_dir)
    cfg, tokenizer, pieces = prepare_run(cfg, run_dir)
    if cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the "
                          f"{jax.process_count()} processes")
    # Each process reads only its part of every global batch.
    data_iter = train_iterator(cfg.data, tokenizer, cfg.batch_size, cfg.seed,
                               jax.process_index(), jax.process_count())
    eval_data = eval_batches(cfg.data, tokenizer, cfg.batch_size, cfg.eval_batches)

    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    counts = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_source = device_peak_flops()
    n_devices = jax.device_count()
    tokens_per_step = cfg.batch_size * cfg.data.seq_len

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state, start = pieces.init_state(), 0
    else:
        state = ckpt.restore(start, pieces.abstract_state(), data_iter)
        print(f"resumed from step {start} in {run_dir}", flush=True)

    summary_path = run_dir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary = {
        "status": "running", "steps": start, "tokens_seen": start * tokens_per_step,
        "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "flops_per_token": fpt, "training_flops": fpt * start * tokens_per_step,
        "final_val_loss": previous.get("final_val_loss"),
        "best_val_loss": previous.get("best_val_loss"),
        "final_val_bpb": previous.get("final_val_bpb"),
    }
    write_json(summary_path, summary)
    print(f"{cfg.name}: {counts['total']:,} params ({counts['non_embedding']:,} non-embedding), "
          f"{fpt / 1e6:.2f} MFLOP/token, {n_devices} {jax.devices()[0].platform} device(s), "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})", flush=True)

    mesh_desc = " x ".join(f"{a}={n}" for a, n in pieces.mesh.shape.items())
    print(f"mesh {mesh_desc} over {jax.process_count()} process(es); per device: params + "
          f"optimizer {per_device_bytes(pieces.abstract_state()) / 2**20:.1f} MiB", flush=True)
    t0 = time.perf_counter()
    train_step, memory = pieces.compile_train_step()
    if memory.get("temp") is not None:
        print(f"compiled train step in {time.perf_counter() - t0:.1f}s; per device: arguments "
              f"{memory['argument'] / 2**20:.1f} MiB, temporaries {memory['temp'] / 2**20:.1f} MiB",
              flush=True)
    eval_step = pieces.eval_step()
    main = jax.process_index() == 0
    sink = MetricsSink(run_dir, cfg.tensorboard, resume_step=start, enabled=main)
    progress = Progress(cfg.steps, enabled=main)

    def run_eval(step: int) -> None:
        result = evaluate(pieces, eval_step, state["params"], eval_data, tokenizer)
        sink.write(step, result, kind="eval")
        best = summary["best_val_loss"]
        summary.update(final_val_loss=result["loss"], final_val_bpb=result["bpb"],
                       best_val_loss=result["loss"] if best is None else min(best, result["loss"]))
        print(f"  eval @ {step}: val loss {result['loss']:.4f} | {result['bpb']:.4f} bits/byte",
              flush=True)

    exit_code, status = 0, "completed"
    # Layers that report a max attention logit: attention layers, unless cuDNN runs them
    # (it does not expose the logits).
    attention_layers = logit_layers(cfg.model)
    window_start, window_steps = time.perf_counter(), 0
    step = start
    with _StopFlag() as stop:
        while step < cfg.steps:
            state, metrics = train_step(state, pieces.global_batch(next(data_iter)))
            loss = float(metrics["loss"])
            step += 1
            window_steps += 1
            if not math.isfinite(loss):
                status, exit_code = f"diverged at step {step}", EXIT_DIVERGED
                print(f"loss is {loss} at step {step}: stopping; the last good checkpoint "
                      "is kept", flush=True)
                break
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / max(window_steps, 1)
                tps = tokens_per_step / step_time
                mfu = fpt * tps / (peak * n_devices)
                record = {k: np.asarray(v) for k, v in metrics.items()}
                # The others report NaN (Mamba-2 / retention have no attention logits).
                record["attn_logit_max"] = {i: record["attn_logit_max"][i]
                                            for i in attention_layers}
                record.update(step_time=step_time, tokens_per_s=tps, mfu=mfu)
                sink.write(step, record)
                progress.line(step, loss, tps, mfu, step_time)
            if step % cfg.log_every == 0:
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                run_eval(step)
                window_start, window_steps = time.perf_counter(), 0
            _inject_fault(step)
            stop.agree()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.signum:
                ckpt.save(step, state, data_iter, force=True)
            summary.update(steps=step, tokens_seen=step * tokens_per_step,
                           training_flops=fpt * step * tokens_per_step)
            if stop.signum:
                status, exit_code = "interrupted", 128 + stop.signum
                print(f"stopped by signal {stop.signum} at step {step}; checkpoint saved; "
                      "rerun the same command to resume", flush=True)
                break

    ckpt.close()
    sink.close()
    summary["status"] = status
    write_json(summary_path, summary)
    return exit_code
