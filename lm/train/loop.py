"""A lone run: resume-or-start, then the driver (lm/train/driver.py) steps, logs,
evaluates, checkpoints and summarises.

This module sets the run up: the batch source (read, stacked and put on the devices ahead
of time by a thread, `lm.data.Prefetcher`, `data.prefetch` deep), the run directory (one
writer: lm/lock.py), the state (the newest intact checkpoint, unreadable ones renamed
aside by lm/train/checkpoint.py; else a LoRA start, an `init_from` fine-tune's start or
a fresh init), the compiled step; then hands `lm.train.driver.drive` a `Job` with one
run. The order of a step's life, signals, failures and exit codes are the driver's;
EXIT_USER_ERROR (2) also when another process holds the run dir or no checkpoint in it
is intact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from lm import config as config_lib
from lm.compress.teacher import with_teacher_width
from lm.config import TrainConfig
from lm.data import (Prefetcher, eval_batches, eval_batches_by_source, prefetch_depth,
                     target_bytes, train_iterator)
from lm.evals.downstream import check_config_tasks, evaluate_during_training
from lm.evals.downstream import due as tasks_due
from lm.lock import hold_for_pod
from lm.model import count_params, flops_per_token, logit_layers
from lm import optim as optim_lib
from lm.parallel.sharding import per_device_bytes
from lm.post.pairs import pair_eval_batches, pair_iterator
from lm.post.reference import attach_frozen
from lm.train import trackers
from lm.compress.sparsity import effective_params
from lm.train.param_source import first_state, run_checkpointer
from lm.train.driver import Job, drive, open_run
from lm.compress.quantize import matmul_precision
from lm.train.mfu import device_peak_flops
from lm.train.setup import RunSetup, check_resumable, setup_run


def evaluate_sums(pieces, eval_step, params, batches, tokenizer) -> tuple:
    """(summed NLL, target tokens, target bytes) over `batches`: floats, or arrays [K]
    when eval_step returns K sums (a batched group's trials, lm/train/trials.py)."""
    nll, count, nbytes = 0.0, 0.0, 0.0
    for batch in batches:
        s, c = eval_step(params, pieces.replicated_batch(batch))
        nll = nll + np.asarray(s, np.float64)
        count = count + np.asarray(c, np.float64)
        nbytes += float(np.sum(target_bytes(batch, tokenizer)))
    return nll, count, nbytes


def _loss_and_bpb(nll, count, nbytes) -> dict:
    loss, bpb = nll / np.maximum(count, 1.0), nll / math.log(2) / max(nbytes, 1.0)
    if np.ndim(loss) == 0:
        return {"loss": float(loss), "bpb": float(bpb)}
    return {"loss": loss, "bpb": bpb}


def evaluate(pieces, eval_step, params, batches, tokenizer) -> dict:
    """{"loss": mean token loss, "bpb": bits per byte} over `batches` (floats, or arrays
    [K] for a batched group's trials)."""
    return _loss_and_bpb(*evaluate_sums(pieces, eval_step, params, batches, tokenizer))


def evaluate_by_source(pieces, eval_step, params, by_source: dict, tokenizer) -> dict:
    """A mixture's validation: {"loss", "bpb"} over every source's validation tokens,
    plus "loss/<source>" and "bpb/<source>" for each."""
    out, total = {}, np.zeros(3)
    for name, batches in by_source.items():
        sums = evaluate_sums(pieces, eval_step, params, batches, tokenizer)
        one = _loss_and_bpb(*sums)
        out[f"loss/{name}"], out[f"bpb/{name}"] = one["loss"], one["bpb"]
        total += np.asarray(sums, np.float64)
    return {**_loss_and_bpb(*total), **out}


def evaluate_preference(pieces, eval_step, params, batches, frozen=()) -> dict:
    """A preference run's validation: the objective's loss, reward accuracy and margin
    and the policy's log-probs, means over the validation pairs (lm/post/preference.py);
    "bpb" is NaN (no byte count is meaningful for a pair loss)."""
    sums: dict = {}
    for batch in batches:
        out = jax.device_get(eval_step(params, pieces.replicated_batch(batch), *frozen))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
    n = np.maximum(sums.pop("pairs", 0.0), 1.0)  # (the same for every trial of a group)
    means = {k: v / n for k, v in sums.items()}  # arrays [K] for a batched group's trials
    return {**{k: float(v) if np.ndim(v) == 0 else v for k, v in means.items()},
            "bpb": float("nan")}


def train(cfg: TrainConfig, run_dir: str | Path, setup: RunSetup | None = None) -> int:
    """Train (or resume) the run in `run_dir`; returns the exit code. `setup`: a prepared
    setup_run(cfg) (lm bench reuses one, and its compiled step, for several runs)."""
    run_dir = Path(run_dir)
    run = setup if setup is not None else setup_run(with_teacher_width(cfg))
    cfg, tokenizer, pieces = run.cfg, run.tokenizer, run.pieces
    # A distillation teacher or a DPO reference: checked against the run (path,
    # tokenizer, vocabulary) before the run dir exists; its weights are read once the
    # run dir is held (lm/compress/teacher.py, lm/post/reference.py).
    attach_frozen(run)
    # Each process reads only its part of every global batch.
    if cfg.objective != "lm":  # preference pairs (lm/post/pairs.py)
        source = pair_iterator(cfg.data, tokenizer, cfg.batch_size, cfg.data_seed,
                               jax.process_index(), jax.process_count(),
                               read_threads=cfg.data.read_threads)
        eval_data = pair_eval_batches(cfg.data, tokenizer, cfg.batch_size, cfg.eval_batches)
    else:
        source = train_iterator(cfg.data, tokenizer, cfg.batch_size, cfg.data_seed,
                                jax.process_index(), jax.process_count(),
                                read_threads=cfg.data.read_threads, steps=cfg.steps)
        eval_data = (eval_batches_by_source(cfg.data, tokenizer, cfg.batch_size,
                                            cfg.eval_batches)
                     or eval_batches(cfg.data, tokenizer, cfg.batch_size, cfg.eval_batches))
    batches = Prefetcher(source, pieces.global_batch,
                         prefetch_depth(cfg.data.prefetch, jax.devices()[0].platform))
    check_config_tasks(cfg.evals)  # unknown task names, data not on disk: one line, now
    trackers.check(cfg)  # a tracker that cannot work (wandb not installed): one line
    # Bad config and data are refused above, before the run dir exists; from here on
    # this process (this pod) is the run dir's one writer, or exits 2 naming the holder.
    with hold_for_pod(run_dir, "lm train"):
        return _train_holding_run_dir(run, run_dir, batches, eval_data, source)


def _train_holding_run_dir(run: RunSetup, run_dir: Path, batches: Prefetcher,
                           eval_data: list | dict, source=None) -> int:
    """eval_data: the validation batches, or a mixture's per source. source: the data
    iterator under the prefetcher (a mixture's reports what each source gave)."""
    cfg, tokenizer, pieces = run.cfg, run.tokenizer, run.pieces
    check_resumable(cfg, run_dir)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    counts = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    teacher = pieces.teacher
    if teacher is not None:  # the teacher's forward (and the losses) run in the same step
        fpt += teacher.step_flops_per_token(cfg.model)
    elif cfg.objective == "dpo":  # a LoRA run's base as the reference: one more forward
        fpt += flops_per_token(cfg.model, cfg.data.seq_len) / 3
    peak, peak_source = device_peak_flops(precision=matmul_precision(cfg.quant))
    n_devices = jax.device_count()
    tokens_per_step = cfg.batch_size * cfg.data.seq_len

    # A LoRA run's checkpoints leave out the frozen base (lm/train/param_source.py).
    ckpt = run_checkpointer(run_dir, pieces)
    # The newest checkpoint that restores; unreadable ones are renamed aside (this
    # process owns the run dir; a LoRA base gone is a ConfigError, nothing renamed).
    # Restores the prefetcher's position too (and starts it).
    restored = ckpt.restore_newest_intact(
        lambda step: ckpt.restore(step, pieces.abstract_state(), batches), rename=True)
    if restored is None:  # the seed's init, or init_from's weights (a LoRA base pinned)
        state, start = first_state(pieces, ckpt), 0
        batches.start_prefetch()
    else:
        start, state = restored
        print(f"resumed from step {start} in {run_dir}", flush=True)

    optim_line, optim_bytes = optim_lib.describe(cfg.optim, cfg.model, pieces.abstract_state())
    main = jax.process_index() == 0
    extra = {}
    if teacher is not None:
        extra["teacher_flops_per_token"] = teacher.forward_flops_per_token()
        # what the model alone costs is flops_per_token minus this (lm analyze --pareto)
        extra["distill_flops_per_token"] = teacher.step_flops_per_token(cfg.model)
    if pieces.sparse_targets:  # the weights under N:M masks, and N:M
        from lm.compress.sparsity import parse_pattern
        from lm.tree import get_path
        abstract = pieces.abstract_state()["params"]
        extra["sparse_params"] = sum(int(np.prod(get_path(abstract, p).shape))
                                     for p in pieces.sparse_targets)
        parse_pattern(cfg.sparsity.pattern)
        extra["sparse_pattern"] = cfg.sparsity.pattern
    run_record = open_run(run_dir, cfg, start, counts, fpt, ckpt, sink_enabled=main,
                          optimizer_state_bytes_per_param=optim_bytes, **extra)
    active = (f", {counts['active']:,} active" if counts["active"] != counts["total"] else "")
    print(f"{cfg.name}: {counts['total']:,} params ({counts['non_embedding']:,} non-embedding"
          f"{active}), "
          f"{fpt / 1e6:.2f} MFLOP/token, {n_devices} {jax.devices()[0].platform} device(s), "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})", flush=True)

    print(optim_line, flush=True)
    mesh_desc = " x ".join(f"{a}={n}" for a, n in pieces.mesh.shape.items())
    print(f"mesh {mesh_desc} over {jax.process_count()} process(es); per device: params + "
          f"optimizer {per_device_bytes(pieces.abstract_state()) / 2**20:.1f} MiB", flush=True)
    if cfg.model.recursion.blocks:  # stored vs computed-with parameters
        from lm.model.recursive import describe
        print(describe(cfg.model), flush=True)
    if cfg.lora.rank:  # the saving: trainable params and optimizer state (lm/peft/lora.py)
        from lm.peft.lora import memory_report
        print(memory_report(pieces.abstract_state()), flush=True)
    step_fn = None
    if teacher is not None:  # frozen: restored at every start, never checkpointed
        teacher_params = teacher.load(run_dir)
        how = (f"{cfg.distill.kind}, T={cfg.distill.temperature:g}, weight "
               f"{cfg.distill.weight:g}" if teacher.role == "teacher" else
               f"{cfg.objective}, beta={cfg.preference.beta:g}")
        print(f"{teacher.describe()}: {how}; its forward adds "
              f"{teacher.forward_flops_per_token() / 1e6:.2f} MFLOP/token", flush=True)
    if cfg.objective != "lm":
        from lm.post.preference import describe
        print(describe(cfg), flush=True)
    t0 = time.perf_counter()
    train_step, memory = run.compiled_train_step()
    if teacher is not None:
        step_fn = lambda s, b: train_step(s, b, teacher_params)  # noqa: E731
    if memory.get("temp") is not None:
        print(f"compiled train step in {time.perf_counter() - t0:.1f}s; per device: arguments "
              f"{memory['argument'] / 2**20:.1f} MiB, temporaries {memory['temp'] / 2**20:.1f} MiB",
              flush=True)
    eval_step = pieces.eval_step() if cfg.objective == "lm" else pieces.preference_eval_step()
    frozen = () if teacher is None else (teacher_params,)
    layers = logit_layers(cfg.model)  # the others report NaN (no attention logits)

    drawn = getattr(source, "drawn", lambda step: None)  # a mixture's tokens per source

    def record(metrics: dict, step: int) -> dict:
        return dict(metrics, attn_logit_max={i: metrics["attn_logit_max"][i] for i in layers},
                    **(drawn(step) or {}))

    def evaluate_state(s) -> list[dict]:
        if cfg.objective != "lm":
            return [evaluate_preference(pieces, eval_step, effective_params(s), eval_data,
                                        frozen)]
        params = effective_params(s)  # a sparse run's masked (lm/compress/sparsity.py)
        result = (evaluate_by_source(pieces, eval_step, params, eval_data, tokenizer)
                  if isinstance(eval_data, dict) else
                  evaluate(pieces, eval_step, params, eval_data, tokenizer))
        step = int(jax.device_get(s["step"]))
        if tasks_due(cfg.evals, cfg.eval_every, step, cfg.steps):
            result.update(evaluate_during_training(run, params, cfg.evals, step, run_dir))
        return [result]

    job = Job(cfg=cfg, runs=[run_record], batches=batches, state=state, start=start,
              step=step_fn or train_step,
              evaluate=evaluate_state,
              checkpoint=lambda s, i: (s, batches),
              tokens_per_step=tokens_per_step, flops_per_token=fpt, peak_flops=peak,
              record=record,
              evaluate_first=bool(cfg.init_from) and start == 0)  # a fine-tune's starting point
    return drive(job)[0]
