"""The training driver: the one owner of the order of a step's life and of what happens
when something fails. A lone run (lm/train/loop.py) and a group of batched trials
(lm/train/trials.py) each build a `Job` (a state, a step function, a batch source,
the run directories it accounts for, how to evaluate and what to checkpoint) and hand
it to `drive`; a new objective (a distillation, DPO or GRPO loss with its batch
source) is one more `Job`, not one more loop.

The order. The driver never waits on the device between steps. Step N+1 is dispatched
before step N's metrics are read ("settled"), so the host enqueues the next step while
the device runs this one; a non-finite loss, gradient norm or parameter
(`metrics["finite"]`) is therefore noticed one step late, and the run stops with status
"diverged at step N", N the step that produced it (a trial of a group is masked by its
step and the others go on). The state is donated to the next step, so at an evaluation,
checkpoint or stop step the driver settles that step BEFORE dispatching the next one: a
checkpoint only ever holds a state verified finite (and the data iterator's position
after the last batch a step consumed). A step a run has already committed is never
written again (a group resuming from the newest step all its trials share re-does
steps some of them saved).

SIGTERM / SIGINT: a single process stops after the current step; the processes of a pod
agree at every `stop_sync_every` steps (a barrier in the coordination service, no device
work) and all stop after the same step, with a checkpoint.

Exit codes (lm/errors.py), per run: 0 done; EXIT_DIVERGED (3): diverged, the last good
checkpoint is kept; 128 + signal number when stopped by a signal after a checkpoint.
For the whole job: EXIT_DISK_FULL (4, `DiskFull` raised): a write found no space (the
half-written checkpoints are removed, the committed ones kept, every summary.json says
so where it can be written); EXIT_POD_PEER_LOST (5): a pod process is gone. Whatever
fails, every checkpointer, metrics sink and the batch source are closed.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import TrainConfig
from lm.errors import EXIT_DIVERGED, EXIT_OK, DiskFull, exit_for_signal, find_disk_full
from lm.parallel.distributed import (coordination_client, is_lost_peer_error, lost_peer,
                                     on_peer_lost)
from lm.parallel.guard import resume_hint, tell
from lm.train.checkpoint import Checkpointer
from lm.train.metrics import MetricsSink, Progress
from lm.train.mfu import mfu

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
    start recorded (`previous`)."""
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


class StopFlag:
    """SIGTERM / SIGINT ask the driver to checkpoint and stop.

    One process: after the current step. A pod: every process must stop after the same
    step (else one checkpoints while the others wait in the next step's collectives), so
    they agree only at steps that are multiples of `every`: each process that has seen a
    signal by then writes it into the coordination service's key-value store, all meet
    at a barrier, and all read the same set of signals. That is host-side RPC, not a
    device collective: it never waits for the steps in flight."""

    _runs = itertools.count()  # one key space per drive() call (the same on every process)

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


class Faults:
    """LMLAB_FAULT=sigterm@N | sigkill@N | nan@N | enospc@N | enospc-metrics@N (tests
    use them):
    sigterm@N: SIGTERM to this process while step N runs (the run stops after step N);
    sigkill@N: SIGKILL to this process once step N's metrics are written, its
    evaluation (if any) done and every checkpoint save started so far committed (so the
    test knows which checkpoint a rerun finds: a kill during an async save could
    otherwise leave step N's predecessor uncommitted on a loaded machine);
    nan@N: step N's batch gets a NaN loss mask (a real divergence: NaN loss, gradients
    and parameters; of every trial of a group);
    enospc@N: the checkpoint write of step N fails with ENOSPC (no space left on
    device), as the save would on a full disk;
    enospc-metrics@N: the metrics write of step N fails likewise.
    `wait_for_saves`: waits until every checkpoint save started so far is committed."""

    def __init__(self, wait_for_saves: Callable[[], None]):
        kind, _, at = os.environ.get("LMLAB_FAULT", "").partition("@")
        self.kind, self.at = kind, int(at) if at else -1
        self.wait_for_saves = wait_for_saves

    def batch(self, step: int, batch: dict) -> dict:
        if self.kind == "nan" and step == self.at:
            return dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
        return batch

    def dispatched(self, step: int) -> None:
        if self.kind == "sigterm" and step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def settled(self, step: int) -> None:
        if self.kind == "sigkill" and step == self.at:
            self.wait_for_saves()
            os.kill(os.getpid(), signal.SIGKILL)

    def writing(self, what: str, step: int, path: Path) -> None:
        """Before the `what` ("checkpoint" | "metrics") write of `step` to `path`."""
        if step == self.at and self.kind == {"checkpoint": "enospc",
                                             "metrics": "enospc-metrics"}[what]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class StepTimer:
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


# ---------------------------------------------------------------------- the job


@dataclass
class Run:
    """One run directory a job accounts for: its summary.json (kept here, written by
    the driver), metrics sink and checkpoints. `label` prefixes the lines about it
    ("" for a lone run, "trial a: " in a group)."""
    directory: Path
    summary: dict
    sink: MetricsSink
    ckpt: Checkpointer
    label: str = ""
    status: str | None = None  # decided (diverged, interrupted); None: still training
    code: int = EXIT_OK

    @property
    def summary_path(self) -> Path:
        return self.directory / "summary.json"


def open_run(directory: Path, cfg: TrainConfig, start: int, counts: dict, fpt: float,
             ckpt: Checkpointer, *, label: str = "", sink_enabled: bool = True,
             **extra) -> Run:
    """A run (re)starting at `start`: its summary.json written as "running" (keeping
    what an earlier start recorded of its evaluations; `extra`: more fields) and its
    metrics sink opened: every tracker the config enables (lm/train/trackers; records
    after `start` dropped from metrics.jsonl, a tracker's run continued)."""
    path = Path(directory) / "summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    summary = initial_summary(cfg, start, previous, counts, fpt, **extra)
    write_json(path, summary)
    sink = MetricsSink(Path(directory), cfg, resume_step=start, enabled=sink_enabled)
    return Run(Path(directory), summary, sink, ckpt, label)


def _one(tree) -> list:
    return [tree]


def _same(record: dict, step: int) -> dict:
    return record


@dataclass
class Job:
    """What a training job supplies to `drive`: the rest (order, cadence, signals,
    divergence, failures, closing, statuses) is the driver's.

    `step(state, batch) -> (state, metrics)` dispatches one step (the state is donated);
    `metrics` holds at least "loss", "finite" and "grad_norm" (device arrays, read one
    step later), each per run along a leading axis when there are several runs.
    `evaluate(state) -> [{"loss", "bpb"}]` one result per run. `checkpoint(state, i) ->
    (state, data iterator)`: what run i's checkpoint holds. `per_run(tree)`: a tree of
    host values split into one per run (default: the one run's). `record(metrics, step)`:
    a run's logged metrics of `step` from its host metrics (default: as they are)."""
    cfg: TrainConfig  # steps; log / eval / checkpoint / stop-sync intervals
    runs: list[Run]  # one, or K trials in the order of the state's trial axis
    batches: Any  # an lm.data.Prefetcher (or any iterator with close()), at `start`
    state: Any  # the state at `start`
    start: int
    step: Callable[[Any, dict], tuple[Any, dict]]
    evaluate: Callable[[Any], list[dict]]
    checkpoint: Callable[[Any, int], tuple[Any, Any]]
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    per_run: Callable[[Any], list] = _one
    record: Callable[[dict, int], dict] = _same
    evaluate_first: bool = False  # evaluate the state at `start` before training
    batched: bool = False  # the runs are trials of one program (lines and records say so)


def drive(job: Job) -> list[int]:
    """Train `job` to `job.cfg.steps` (or until it stops); each run's exit code.
    Raises DiskFull (every summary says so) when a write found no space."""
    cfg, runs, batches = job.cfg, job.runs, job.batches
    k = len(runs)
    main = jax.process_index() == 0
    progress = Progress(cfg.steps, enabled=main)
    faults = Faults(lambda: [r.ckpt.wait() for r in runs])
    timer = StepTimer()
    n_devices = jax.device_count()
    tokens, fpt = job.tokens_per_step, job.flops_per_token
    # The write started last: where a full disk that names no path of its own was hit.
    writing = {"path": runs[0].directory}

    def settle(step: int, metrics: dict) -> bool:
        """Read step `step`'s metrics (it has finished or is about to); log them on log
        steps. False: no run is left to train (they diverged), stop."""
        loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
        timer.settled += 1
        for i, (run, loss_i, ok) in enumerate(zip(runs, job.per_run(loss), job.per_run(finite))):
            if run.status is not None:
                continue
            if not ok:
                run.status, run.code = f"diverged at step {step}", EXIT_DIVERGED
                grad_norm = float(job.per_run(jax.device_get(metrics["grad_norm"]))[i])
                then = ("masked; its last good checkpoint is kept" if job.batched
                        else "stopping; the last good checkpoint is kept")
                print(f"{run.label}non-finite step {step} (loss {float(loss_i)}, grad norm "
                      f"{grad_norm}): {then}", flush=True)
                continue
            run.summary.update(steps=step, tokens_seen=step * tokens,
                               training_flops=fpt * step * tokens)
        live = [i for i, r in enumerate(runs) if r.status is None]
        if not live:
            return False
        if step % cfg.log_every == 0 or step == cfg.steps:
            step_time = timer.step_time()
            tps = tokens / step_time  # per run: each run's own tokens
            util = mfu(fpt, tps, job.peak_flops, n_devices)
            host = job.per_run({n: jax.tree.map(np.asarray, v)
                                for n, v in jax.device_get(metrics).items() if n != "finite"})
            for i in live:
                record = job.record(host[i], step)
                record.update(step_time=step_time, tokens_per_s=tps, mfu=util)
                if job.batched:
                    record["group_tokens_per_s"] = tps * k
                writing["path"] = runs[i].sink.path
                faults.writing("metrics", step, runs[i].sink.path)
                runs[i].sink.write(step, record)
            losses = [float(host[i]["loss"]) for i in live]
            if job.batched:
                progress.line(step, float(np.mean(losses)), tps * k,
                              mfu(fpt, tps * k, job.peak_flops, n_devices), step_time,
                              extra=f"{len(live)}/{k} trials, loss "
                                    f"{min(losses):.3f}..{max(losses):.3f}")
            else:
                progress.line(step, losses[0], tps, util, step_time)
            timer.restart()
        return True

    def run_eval(step: int) -> None:
        results = job.evaluate(job.state)
        live = []
        for run, result in zip(runs, results):
            if run.status is not None:
                continue
            writing["path"] = run.sink.path
            run.sink.write(step, result, kind="eval")
            best = run.summary["best_val_loss"]
            run.summary.update(final_val_loss=result["loss"], final_val_bpb=result["bpb"],
                               best_val_loss=(result["loss"] if best is None
                                              else min(best, result["loss"])))
            # A mixture's per-source validation (final_val_loss/<source>, ...) and downstream
            # task scores (lm/evals/downstream.py), as of their latest evaluation.
            run.summary.update({f"final_val_{k}": v for k, v in result.items()
                                if k.startswith(("loss/", "bpb/"))})
            run.summary.update({k: v for k, v in result.items() if k.startswith("tasks/")})
            live.append(result["loss"])
        if not job.batched:
            r = results[0]
            second = (f"reward accuracy {r['reward_accuracy']:.3f}, margin "
                      f"{r['reward_margin']:.4f}" if "reward_accuracy" in r  # lm/post
                      else f"{r['bpb']:.4f} bits/byte")
            print(f"  eval @ {step}: val loss {r['loss']:.4f} | {second}", flush=True)
        elif live:
            print(f"  eval @ {step}: val loss {min(live):.4f}..{max(live):.4f} over "
                  f"{len(live)} trials", flush=True)

    def save(step: int) -> None:
        live = [(i, r) for i, r in enumerate(runs) if r.status is None]
        faults.writing("checkpoint", step, live[0][1].ckpt.directory / str(step))
        for i, run in live:
            if step not in run.ckpt.committed_steps():  # committed: never written again
                writing["path"] = run.ckpt.directory / str(step)
                run.ckpt.save(step, *job.checkpoint(job.state, i), force=True)

    def record_lost_peer(lost: str) -> str:
        """A pod process is gone (lm/parallel/distributed.py leaves with one line)."""
        for run in runs:
            run.summary["status"] = f"failed: the pod lost {lost}"
            write_json(run.summary_path, run.summary)
        return resume_hint(str(runs[0].directory))

    if jax.process_count() > 1:
        on_peer_lost(record_lost_peer)
        tell(run_dir=str(runs[0].directory.absolute()))  # for the guard, if this process aborts
    # The handlers stay installed until the summaries are written: a pod's launcher sends
    # SIGTERM to processes that are still shutting down after an agreed stop.
    with StopFlag(cfg.stop_sync_every) as stop:
        try:
            step, pending = job.start, None  # pending: the dispatched, unread step
            if job.evaluate_first:
                run_eval(step)
            timer.restart()
            while step < cfg.steps:
                batch = faults.batch(step + 1, next(batches))
                job.state, metrics = job.step(job.state, batch)
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
                        save(step)
                    faults.settled(step)
                    timer.restart()
                if signum:
                    for run in runs:
                        if run.status is None:
                            run.status, run.code = "interrupted", exit_for_signal(signum)
                    saved = "checkpoints saved" if job.batched else "checkpoint saved"
                    print(f"stopped by signal {signum} at step {step}; {saved}; "
                          "rerun the same command to resume", flush=True)
                    break
        except Exception as e:  # noqa: BLE001 (re-raised below unless the disk is full)
            if is_lost_peer_error(e):  # leaves now: closing would wait for the dead peer
                lost_peer(str(e))
            failure = e
        else:
            failure = None
        # All of them, whatever fails: a checkpointer left unclosed would drop its
        # pending async save. The sinks last, told how each run ended (summary.json's
        # fields, as written below) unless something failed on the way.
        def close_sink(run: Run) -> None:
            run.sink.close(None if failure is not None else
                           dict(run.summary, status=run.status or "completed"))

        for close in [batches.close, *(r.ckpt.close for r in runs),
                      *(functools.partial(close_sink, r) for r in runs)]:
            try:
                close()
            except Exception as e:  # noqa: BLE001 (an async save's error surfaces here)
                failure = failure or e
        if failure is not None:
            full = find_disk_full(failure, str(writing["path"]))
            if full is None:
                raise failure
            raise _stopped_by_full_disk(full, runs)
        for run in runs:
            run.summary["status"] = run.status or "completed"
            write_json(run.summary_path, run.summary)
        on_peer_lost(None)  # the runs' account is written: a peer leaving now changes nothing
    return [run.code for run in runs]


def _stopped_by_full_disk(full: DiskFull, runs: list[Run]) -> DiskFull:
    """A write failed for want of space: the checkpoints being written when it did
    (orbax's `<step>.orbax-checkpoint-tmp*` directories, never committed, never listed
    as steps) are removed, which gives their space back; each summary.json says what
    happened where it can still be written; the committed checkpoints are untouched."""
    # The failed save's writes that were never started are dropped with it; Python
    # would list each at exit ("coroutine ... was never awaited").
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    if jax.process_index() == 0:
        for run in runs:
            for partial in run.ckpt.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
    inside = Path(full.path)
    for run in runs:
        if run.ckpt.directory in inside.parents:  # name the step, not a file of its copy
            step = inside.relative_to(run.ckpt.directory).parts[0].split(".")[0]
            full = DiskFull(str(run.ckpt.directory / step))
            break
    # Where a rerun resumes: the newest step every run has committed.
    committed = set.intersection(*(set(r.ckpt.committed_steps()) for r in runs))
    recorded = ""
    for run in runs:
        run.summary["status"] = f"failed: no space left on device ({full.path})"
        try:
            write_json(run.summary_path, run.summary)
        except OSError:
            recorded = recorded or f"; {run.summary_path} could not be updated"
    resume = (f"checkpoints up to step {max(committed)} are intact: free space and rerun "
              "the same command to resume" if committed else "no checkpoint was written yet")
    return DiskFull(full.path, resume + recorded)
