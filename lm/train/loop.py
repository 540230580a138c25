"""The training loop: resume-or-start, step, log, evaluate, checkpoint, summarise.

The loop never waits on the device between steps. Batches are read, stacked and put on
the devices ahead of time by a thread (`lm.data.Prefetcher`, `data.prefetch` deep).
Step N+1 is dispatched before step N's metrics are read ("settled"), so the host
enqueues the next step while the device runs this one; a non-finite loss, gradient norm
or parameter (`metrics["finite"]`) is therefore noticed one step late, and the run stops
with status "diverged at step N", N the step that produced it. The state is donated to
the next step, so at an evaluation, checkpoint or stop step the loop settles that step
BEFORE dispatching the next one: a checkpoint only ever holds a state verified finite
(and the data iterator's position after the last batch a step consumed).

SIGTERM / SIGINT: a single process stops after the current step; the processes of a pod
agree at every `stop_sync_every` steps (a barrier in the coordination service, no device
work) and all stop after the same step, with a checkpoint.

Exit codes (lm/errors.py): 0 done; EXIT_DIVERGED (3): diverged, the last good
checkpoint is kept; 128 + signal number when stopped by a signal after a checkpoint;
EXIT_DISK_FULL (4): a write found no space (the half-written checkpoint is removed, the
committed ones kept); EXIT_POD_PEER_LOST (5): a pod process is gone; EXIT_USER_ERROR (2)
also when another process holds the run dir (lm/lock.py) or no checkpoint in it is
intact (unreadable ones are renamed aside: lm/train/checkpoint.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm.config import TrainConfig
from lm.data import Prefetcher, eval_batches, prefetch_depth, target_bytes, train_iterator
from lm.errors import EXIT_DIVERGED, EXIT_OK, DiskFull, exit_for_signal, find_disk_full
from lm.lock import hold_for_pod
from lm.model import count_params, flops_per_token, logit_layers
from lm.parallel.distributed import (coordination_client, is_lost_peer_error, lost_peer,
                                     on_peer_lost)
from lm.parallel.guard import resume_hint, tell
from lm import optim as optim_lib
from lm.parallel.sharding import per_device_bytes
from lm.train.checkpoint import Checkpointer
from lm.train.metrics import MetricsSink, Progress
from lm.train.mfu import device_peak_flops, mfu
from lm.train.param_source import first_state, run_checkpointer
from lm.train.setup import RunSetup, check_resumable, setup_run

STOP_BARRIER_TIMEOUT_MS = 30 * 60 * 1000  # a pod's processes reach a sync step together


def write_json(path: Path, obj: dict) -> None:
    if jax.process_index() != 0:  # one writer per run dir (every process holds the same)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def initial_summary(cfg: TrainConfig, start: int, previous: dict, counts: dict, fpt: float,
                    **extra) -> dict:
    """summary.json of a run (re)starting at `start`: sizes (`counts`: count_params),
    FLOPs (`fpt`: flops_per_token), progress, and the evaluation results an earlier
    start recorded (`previous`). Also batched trials'."""
    tokens = cfg.batch_size * cfg.data.seq_len
    return {
        "status": "running", "steps": start, "tokens_seen": start * tokens,
        "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "active_params": counts["active"],
        "active_non_embedding_params": counts["active_non_embedding"],
        "flops_per_token": fpt, "training_flops": fpt * start * tokens,
        "final_val_loss": previous.get("final_val_loss"),
        "best_val_loss": previous.get("best_val_loss"),
        "final_val_bpb": previous.get("final_val_bpb"),
        **extra,
    }


def due(cfg: TrainConfig, step: int, signum) -> tuple[bool, bool]:
    """(evaluate now, save now) after `step`: on their intervals, at the last step, and
    a save when a stop signal arrived."""
    last = step == cfg.steps
    return (step % cfg.eval_every == 0 or last,
            step % cfg.checkpoint_every == 0 or last or bool(signum))


def evaluate(pieces, eval_step, params, batches, tokenizer) -> dict:
    """{"loss": mean token loss, "bpb": bits per byte} over `batches`: floats, or arrays
    [K] when eval_step returns K sums (a batched group's trials, lm/train/trials.py)."""
    nll, count, nbytes = 0.0, 0.0, 0.0
    for batch in batches:
        s, c = eval_step(params, pieces.replicated_batch(batch))
        nll = nll + np.asarray(s, np.float64)
        count = count + np.asarray(c, np.float64)
        nbytes += float(np.sum(target_bytes(batch, tokenizer)))
    loss, bpb = nll / np.maximum(count, 1.0), nll / math.log(2) / max(nbytes, 1.0)
    if np.ndim(loss) == 0:
        return {"loss": float(loss), "bpb": float(bpb)}
    return {"loss": loss, "bpb": bpb}


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop.

    One process: after the current step. A pod: every process must stop after the same
    step (else one checkpoints while the others wait in the next step's collectives), so
    they agree only at steps that are multiples of `every`: each process that has seen a
    signal by then writes it into the coordination service's key-value store, all meet
    at a barrier, and all read the same set of signals. That is host-side RPC, not a
    device collective: it never waits for the steps in flight."""

    _runs = itertools.count()  # one key space per train() call (the same on every process)

    def __init__(self, every: int):
        self.every = every
        self.signum = 0
        self._old = {}
        self._key = f"lmlab/stop/{next(self._runs)}"

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self, step: int) -> int:
        """The signal to stop on after `step` (0 = go on); the same on every process."""
        if jax.process_count() == 1:
            return self.signum
        if step % self.every:
            return 0
        local = self.signum  # what this process announces; a later signal waits a round
        client = coordination_client()
        if client is None:  # no coordination service: a device all-gather (rare steps)
            from jax.experimental import multihost_utils
            return int(np.max(multihost_utils.process_allgather(np.int32(local))))
        key = f"{self._key}/{step}"
        if local:
            client.key_value_set(f"{key}/{jax.process_index()}", str(local))
        client.wait_at_barrier(key, STOP_BARRIER_TIMEOUT_MS)
        return max((int(v) for _, v in client.key_value_dir_get(f"{key}/")), default=0)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Faults:
    """LMLAB_FAULT=sigterm@N | sigkill@N | nan@N | enospc@N | enospc-metrics@N (tests
    use them):
    sigterm@N: SIGTERM to this process while step N runs (the run stops after step N);
    sigkill@N: SIGKILL to this process once step N's metrics are written, its
    evaluation (if any) done and every checkpoint save started so far committed (so the
    test knows which checkpoint a rerun finds: a kill during an async save could
    otherwise leave step N's predecessor uncommitted on a loaded machine);
    nan@N: step N's batch gets a NaN loss mask (a real divergence: NaN loss, gradients
    and parameters);
    enospc@N: the checkpoint write of step N fails with ENOSPC (no space left on
    device), as the save would on a full disk;
    enospc-metrics@N: the metrics write of step N fails likewise."""

    def __init__(self, checkpointer):
        kind, _, at = os.environ.get("LMLAB_FAULT", "").partition("@")
        self.kind, self.at = kind, int(at) if at else -1
        self.checkpointer = checkpointer

    def batch(self, step: int, batch: dict) -> dict:
        if self.kind == "nan" and step == self.at:
            return dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
        return batch

    def dispatched(self, step: int) -> None:
        if self.kind == "sigterm" and step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def settled(self, step: int) -> None:
        if self.kind == "sigkill" and step == self.at:
            self.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    def writing(self, what: str, step: int, path: Path) -> None:
        """Before the `what` ("checkpoint" | "metrics") write of `step` to `path`."""
        if step == self.at and self.kind == {"checkpoint": "enospc",
                                             "metrics": "enospc-metrics"}[what]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _StepTimer:
    """Mean step time over a window, from the number of steps the device has completed.
    With asynchronous dispatch that is the settled steps; with synchronous dispatch (JAX
    on CPU under lm/hostmem.py) a dispatch returns once the step ran, so it is the
    dispatched ones. A window restarts after each log, evaluation and checkpoint."""

    def __init__(self):
        self.sync = (jax.default_backend() == "cpu"
                     and not getattr(jax.config, "values", {}).get(
                         "jax_cpu_enable_async_dispatch", True))
        self.dispatched = self.settled = 0
        self.restart()

    def restart(self) -> None:
        self.t0, self.done0 = time.perf_counter(), self._done()

    def _done(self) -> int:
        return self.dispatched if self.sync else self.settled

    def step_time(self) -> float:
        return (time.perf_counter() - self.t0) / max(self._done() - self.done0, 1)


def train(cfg: TrainConfig, run_dir: str | Path, setup: RunSetup | None = None) -> int:
    """Train (or resume) the run in `run_dir`; returns the exit code. `setup`: a prepared
    setup_run(cfg) (lm bench reuses one, and its compiled step, for several runs)."""
    run_dir = Path(run_dir)
    run = setup if setup is not None else setup_run(cfg)
    cfg, tokenizer, pieces = run.cfg, run.tokenizer, run.pieces
    # Each process reads only its part of every global batch.
    source = train_iterator(cfg.data, tokenizer, cfg.batch_size, cfg.data_seed, jax.process_index(),
                            jax.process_count(), read_threads=cfg.data.read_threads)
    batches = Prefetcher(source, pieces.global_batch,
                         prefetch_depth(cfg.data.prefetch, jax.devices()[0].platform))
    eval_data = eval_batches(cfg.data, tokenizer, cfg.batch_size, cfg.eval_batches)
    # Bad config and data are refused above, before the run dir exists; from here on
    # this process (this pod) is the run dir's one writer, or exits 2 naming the holder.
    with hold_for_pod(run_dir, "lm train"):
        return _train_holding_run_dir(run, run_dir, batches, eval_data)


def _train_holding_run_dir(run: RunSetup, run_dir: Path, batches: Prefetcher,
                           eval_data: list) -> int:
    cfg, tokenizer, pieces = run.cfg, run.tokenizer, run.pieces
    check_resumable(cfg, run_dir)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    counts = count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_source = device_peak_flops()
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
    summary_path = run_dir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary = initial_summary(cfg, start, previous, counts, fpt,
                              optimizer_state_bytes_per_param=optim_bytes)
    write_json(summary_path, summary)
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
    t0 = time.perf_counter()
    train_step, memory = run.compiled_train_step()
    if memory.get("temp") is not None:
        print(f"compiled train step in {time.perf_counter() - t0:.1f}s; per device: arguments "
              f"{memory['argument'] / 2**20:.1f} MiB, temporaries {memory['temp'] / 2**20:.1f} MiB",
              flush=True)
    eval_step = pieces.eval_step()
    main = jax.process_index() == 0
    sink = MetricsSink(run_dir, cfg.tensorboard, resume_step=start, enabled=main)
    progress = Progress(cfg.steps, enabled=main)
    faults = _Faults(ckpt)
    timer = _StepTimer()
    layers = logit_layers(cfg.model)  # the others report NaN (no attention logits)
    outcome = {"status": "completed", "code": EXIT_OK}

    def settle(step: int, metrics: dict) -> bool:
        """Read step `step`'s metrics (it has finished or is about to); log them on log
        steps. False: the step diverged, stop."""
        loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
        timer.settled += 1
        if not finite:
            outcome.update(status=f"diverged at step {step}", code=EXIT_DIVERGED)
            grad_norm = float(jax.device_get(metrics["grad_norm"]))
            print(f"non-finite step {step} (loss {float(loss)}, grad norm {grad_norm}): "
                  "stopping; the last good checkpoint is kept", flush=True)
            return False
        summary.update(steps=step, tokens_seen=step * tokens_per_step,
                       training_flops=fpt * step * tokens_per_step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            step_time = timer.step_time()
            tps = tokens_per_step / step_time
            util = mfu(fpt, tps, peak, n_devices)
            record = {k: jax.tree.map(np.asarray, v) for k, v in jax.device_get(metrics).items()
                      if k != "finite"}
            record["attn_logit_max"] = {i: record["attn_logit_max"][i] for i in layers}
            record.update(step_time=step_time, tokens_per_s=tps, mfu=util)
            faults.writing("metrics", step, sink.path)
            sink.write(step, record)
            progress.line(step, float(loss), tps, util, step_time)
            timer.restart()
        return True

    def run_eval(step: int) -> None:
        result = evaluate(pieces, eval_step, state["params"], eval_data, tokenizer)
        sink.write(step, result, kind="eval")
        best = summary["best_val_loss"]
        summary.update(final_val_loss=result["loss"], final_val_bpb=result["bpb"],
                       best_val_loss=result["loss"] if best is None else min(best, result["loss"]))
        print(f"  eval @ {step}: val loss {result['loss']:.4f} | {result['bpb']:.4f} bits/byte",
              flush=True)

    def record_lost_peer(lost: str) -> str:
        """A pod process is gone (lm/parallel/distributed.py leaves with one line)."""
        summary["status"] = f"failed: the pod lost {lost}"
        if jax.process_index() == 0:
            write_json(summary_path, summary)
        return resume_hint(str(run_dir))

    if jax.process_count() > 1:
        on_peer_lost(record_lost_peer)
        tell(run_dir=str(run_dir.absolute()))  # for the guard, if this process aborts
    # The handlers stay installed until the summary is written: a pod's launcher sends
    # SIGTERM to processes that are still shutting down after an agreed stop.
    with _StopFlag(cfg.stop_sync_every) as stop:
        try:
            step, pending = start, None  # pending: the dispatched, unread step
            if cfg.init_from and start == 0:  # a fine-tune's starting point
                run_eval(0)
            while step < cfg.steps:
                batch = faults.batch(step + 1, next(batches))
                state, metrics = train_step(state, batch)
                step += 1
                timer.dispatched += 1
                faults.dispatched(step)
                if pending is not None:
                    if not settle(*pending):
                        break
                    faults.settled(pending[0])
                pending = (step, metrics)
                signum = stop.requested(step)
                evaluate_now, save_now = due(cfg, step, signum)
                if evaluate_now or save_now:
                    # The next step would take (donate) this state: verify it first.
                    pending = None
                    if not settle(step, metrics):
                        break
                    if evaluate_now:
                        run_eval(step)
                    if save_now:
                        faults.writing("checkpoint", step, ckpt.directory / str(step))
                        ckpt.save(step, state, batches, force=True)
                    faults.settled(step)
                    timer.restart()
                if signum:
                    outcome.update(status="interrupted", code=exit_for_signal(signum))
                    print(f"stopped by signal {signum} at step {step}; checkpoint saved; "
                          "rerun the same command to resume", flush=True)
                    break
        except Exception as e:  # noqa: BLE001 (re-raised below unless the disk is full)
            if is_lost_peer_error(e):  # leaves now: closing would wait for the dead peer
                lost_peer(str(e))
            failure = e
        else:
            failure = None
        for close in (batches.close, ckpt.close, sink.close):  # all of them, whatever fails
            try:
                close()
            except Exception as e:  # noqa: BLE001 (an async save's error surfaces here)
                failure = failure or e
        if failure is not None:
            full = find_disk_full(failure, str(run_dir))
            if full is None:
                raise failure
            raise _stopped_by_full_disk(full, ckpt, summary, summary_path)
        summary["status"] = outcome["status"]
        write_json(summary_path, summary)
        on_peer_lost(None)  # the run's account is written: a peer leaving now changes nothing
    return outcome["code"]


def _stopped_by_full_disk(full: DiskFull, ckpt: Checkpointer, summary: dict,
                          summary_path: Path) -> DiskFull:
    """A write failed for want of space: the checkpoint being written when it did
    (orbax's `<step>.orbax-checkpoint-tmp*` directory, never committed, never listed as
    a step) is removed, which gives its space back; summary.json says what happened
    where it can still be written; the committed checkpoints are untouched."""
    # The failed save's writes that were never started are dropped with it; Python
    # would list each at exit ("coroutine ... was never awaited").
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    if jax.process_index() == 0:
        for partial in ckpt.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
    inside = Path(full.path)
    if ckpt.directory in inside.parents:  # name the step, not a file of its removed copy
        step = inside.relative_to(ckpt.directory).parts[0].split(".")[0]
        full = DiskFull(str(ckpt.directory / step))
    committed = ckpt.committed_steps()
    summary["status"] = f"failed: no space left on device ({full.path})"
    try:
        write_json(summary_path, summary)
        recorded = ""
    except OSError:
        recorded = f"; {summary_path} could not be updated"
    resume = (f"checkpoints up to step {max(committed)} are intact: free space and rerun "
              "the same command to resume" if committed else "no checkpoint was written yet")
    return DiskFull(full.path, resume + recorded)
