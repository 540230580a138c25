"""`lm rl`: a GRPO run (lm/post/grpo.py) on a synthetic verifiable task
(lm/post/rl_tasks.py), generation by lmlab's inference engine (lm/infer/engine.py) and
learning alternating in one process on the same devices.

RL step s (1-based) learns from rollout batch B_s: `rl.prompts` prompts of step s-1
(drawn by seed), `rl.group` samples each from the engine at `rl.temperature`, each
prompt's sampling seed fixed by (seed, step, prompt), so the rollouts repeat. B_s was
sampled by the params after step s-1-k (k = rl.lag; the initial policy before step 1),
and π_old is that sampling policy's log-probs, computed once per batch. The engine reads
the learner's params themselves (the same device arrays, sharded as the learner holds
them: no host copy, on a pod as here); a lag keeps k device copies of earlier params.

The order of a step: μ = rl.updates_per_batch optimizer updates on B_s, then the rollout
B_{s+1} (so the batch a checkpoint holds is the next one, already sampled), log, save.
A checkpoint holds {"train": the train state, "rollout": B_{s+1}, "lagged": the k
params the next k rollouts are sampled by, "reference": the initial policy (only with
rl.kl_weight > 0)}: a resumed run samples nothing twice and
repeats the uninterrupted run's rollouts and losses. The run dir is a training run's
(config.json, metrics.jsonl, summary.json, checkpoints/; one writer, lm/lock.py), and
SIGTERM / LMLAB_FAULT=sigterm@N stop it after the step with a checkpoint (exit 143).

Logged per step: reward mean and std, completion lengths, the share of groups whose
rewards all agree (no signal), KL to the reference (rl.kl_weight > 0), the clip
fraction, and the seconds of generation (engine, rewards, π_old and reference
log-probs) and of learning, with their shares of the step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.errors import EXIT_DIVERGED, EXIT_OK, exit_for_signal
from lm.infer.engine import Engine, Request
from lm.lock import hold_for_pod
from lm.parallel.sharding import replicated
from lm.post import grpo, rl_tasks
from lm.train.driver import Faults, StopFlag, write_json
from lm.train.metrics import MetricsSink
from lm.train.param_source import first_state, run_checkpointer
from lm.train.setup import RunSetup, check_resumable, setup_run

ROLLOUT_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "old_logp",
                "ref_logp", "advantage")
PAGE_SIZE = 16


def rl_config(cfg: TrainConfig) -> TrainConfig:
    """cfg for an RL run: the learner's batch is one rollout batch (prompts x group)."""
    if cfg.lora.rank:
        raise ConfigError("lm rl: LoRA policies are not supported yet (lora.rank must be 0)")
    if cfg.grad_accum != 1:
        raise ConfigError("lm rl: grad_accum must be 1 (one rollout batch per update)")
    rl = cfg.rl
    return config_lib.validate(dataclasses.replace(cfg, batch_size=rl.prompts * rl.group))


class _Cursor:
    """The run's position as grain's checkpoint protocol wants a data iterator: the RL
    step (the rollout batch itself is in the checkpointed tree)."""

    def __init__(self, step: int = 0):
        self.step = step

    def get_state(self) -> bytes:
        return json.dumps({"rl_step": self.step}).encode()

    def set_state(self, state: bytes) -> None:
        self.step = json.loads(state)["rl_step"]

    def start_prefetch(self) -> None:
        pass


def _sampling_seed(seed: int, step: int, prompt: int) -> int:
    return int(np.random.SeedSequence([seed, step, prompt]).generate_state(1)[0] >> 1)


class Rollouts:
    """Rollout batches of a run: the engine's samples, rewards, advantages, and the
    sampling policy's (and the reference's) log-probs."""

    def __init__(self, run: RunSetup):
        self.run, self.cfg = run, run.cfg
        pieces = run.pieces
        self.reward = rl_tasks.reward_function(self.cfg.rl.reward)
        self.logp = pieces.params_batch_fn(
            "rl_logp", lambda p, b: grpo.logprobs(pieces.graphdef, p, b, pieces.loss_chunk))
        self.shape = (self.cfg.batch_size, self.cfg.data.seq_len)

    def abstract(self) -> dict:
        sh = self.run.pieces.batch_sharding
        out = {k: jax.ShapeDtypeStruct(self.shape, jnp.float32 if k in (
            "loss_mask", "old_logp", "ref_logp", "advantage") else jnp.int32, sharding=sh)
               for k in ROLLOUT_KEYS}
        rep = replicated(self.run.pieces.mesh)
        b = self.shape[0]
        out["rewards"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rep)
        out["lengths"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep)
        out["gen_seconds"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        out["bad_rewards"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        return out

    def sample(self, step: int, params, ref_params) -> dict:
        """Rollout batch of RL step step + 1 (problems of `step`), sampled by `params`."""
        t0 = time.perf_counter()
        cfg, rl, tok = self.cfg, self.cfg.rl, self.run.tokenizer
        problems = rl_tasks.problems(rl.task, rl.size, cfg.seed, step, rl.prompts)
        prompts = [[int(t) for t in tok.frame(tok.encode(p.prompt))] for p in problems]
        # A row holds prompt + completion less one token: no sequence needs more pages.
        max_len = min(cfg.model.max_seq_len, cfg.data.seq_len + 1)
        for p, ids in zip(problems, prompts):
            if len(ids) >= max_len:
                raise ConfigError(f"data.seq_len={cfg.data.seq_len} (model.max_seq_len="
                                  f"{cfg.model.max_seq_len}) leaves no room to generate after "
                                  f"the prompt {p.prompt!r} ({len(ids)} tokens); raise it")
        per_seq = -(-max_len // PAGE_SIZE)
        # The learner's params as they are (no copy): the engine reads the same arrays.
        engine = Engine(self.run.pieces.graphdef, params, slots=cfg.batch_size,
                        pages=cfg.batch_size * per_seq + 1, page_size=PAGE_SIZE,
                        max_seq_len=max_len)
        stops = tuple(int(s) for s in tok.stop_ids)
        results = engine.generate(
            Request(tuple(ids), max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                    seed=_sampling_seed(cfg.seed, step, i), stop_ids=stops, n=rl.group,
                    id=i, keep_stop=True)
            for i, ids in enumerate(prompts))
        b, t = self.shape
        rows = {k: np.zeros(self.shape, np.float32 if k == "loss_mask" else np.int32)
                for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        rewards = np.zeros((rl.prompts, rl.group), np.float32)
        lengths = np.zeros(b, np.int32)
        bad = 0
        for i, (problem, ids, result) in enumerate(zip(problems, prompts, results)):
            for g, c in enumerate(result.completions):
                r = i * rl.group + g
                text = tok.decode([x for x in c.tokens if x not in stops])
                try:
                    rewards[i, g] = rl_tasks.score(self.reward, problem, text)
                except rl_tasks.RewardError:
                    if not rl.skip_bad_rewards:
                        raise
                    bad += 1  # reward 0
                seq = ids + list(c.tokens)
                if len(seq) - 1 > t:
                    raise ConfigError(f"data.seq_len={t} is too short for a prompt of "
                                      f"{len(ids)} tokens and {len(c.tokens)} generated "
                                      f"(rl.max_new_tokens={rl.max_new_tokens}); raise it")
                n = len(seq) - 1
                rows["inputs"][r, :n] = seq[:-1]
                rows["targets"][r, :n] = seq[1:]
                rows["positions"][r, :n] = np.arange(n)
                rows["segment_ids"][r, :n] = 1
                rows["loss_mask"][r, len(ids) - 1:n] = 1.0
                lengths[r] = len(c.tokens)
        adv = grpo.group_advantages(rewards).reshape(b)
        rows["advantage"] = (adv[:, None] * rows["loss_mask"]).astype(np.float32)
        batch = self.run.pieces.replicated_batch(rows)
        batch["old_logp"] = self.logp(params, batch)
        batch["ref_logp"] = (self.logp(ref_params, batch) if ref_params is not None
                             else jnp.zeros(self.shape, jnp.float32))
        rep = replicated(self.run.pieces.mesh)
        put = lambda x: jax.device_put(x, rep)  # noqa: E731
        for key in ("old_logp", "ref_logp"):  # laid out as the rows (the checkpoint's)
            batch[key] = jax.device_put(batch[key], self.run.pieces.batch_sharding)
        batch["rewards"] = put(rewards.reshape(b))
        batch["lengths"] = put(lengths)
        batch["bad_rewards"] = put(np.int32(bad))
        jax.block_until_ready(batch["old_logp"])
        batch["gen_seconds"] = put(np.float32(time.perf_counter() - t0))
        return batch


def rollout_metrics(batch: dict, group: int) -> dict:
    rewards = np.asarray(batch["rewards"], np.float64)
    lengths = np.asarray(batch["lengths"])
    by_group = rewards.reshape(-1, group)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "completion_len_mean": float(lengths.mean()),
            "completion_len_max": int(lengths.max()),
            "no_signal_groups": float((by_group == by_group[:, :1]).all(1).mean()),
            "bad_rewards": int(batch["bad_rewards"])}


def _log_line(step: int, steps: int, window: list[dict]) -> str:
    """The console line of the steps since the last one (their means)."""
    def mean(key: str) -> float:
        return float(np.mean([w[key] for w in window]))
    kl = f" | kl {mean('kl'):.4f}" if "kl" in window[-1] else ""
    seconds = mean("gen_seconds") + mean("learn_seconds")
    return (f"step {step}/{steps} | reward {mean('reward_mean'):.3f} (std "
            f"{mean('reward_std'):.3f}) | len {mean('completion_len_mean'):.1f} | loss "
            f"{mean('loss'):.4f}{kl} | clip {mean('clip_fraction'):.3f} | gen "
            f"{100 * mean('gen_share'):.0f}% learn {100 * mean('learn_share'):.0f}% of "
            f"{seconds:.2f}s")


def train_rl(cfg: TrainConfig, run_dir: str | Path) -> int:
    """Run (or resume) the RL run in run_dir; the exit code."""
    run_dir = Path(run_dir)
    run = setup_run(rl_config(cfg))
    rollouts = Rollouts(run)  # a reward file that does not load: one line, nothing written
    with hold_for_pod(run_dir, "lm rl"):
        return _run_holding_dir(run, run_dir, rollouts)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _run_holding_dir(run: RunSetup, run_dir: Path, rollouts: Rollouts) -> int:
    cfg, pieces, rl = run.cfg, run.pieces, run.cfg.rl
    check_resumable(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    ckpt = run_checkpointer(run_dir, pieces)
    cursor = _Cursor()
    # The reference: the initial policy, frozen; never made when kl_weight is 0. It is
    # checkpointed (a source run may have trained on since: its newest checkpoint is
    # no longer the policy this run started from).
    need_ref = rl.kl_weight > 0
    params_abstract = pieces.abstract_state()["params"]
    # Beside the train state (an ordinary checkpoint: lm eval / sample / export read it)
    # an item of its own: the next rollout batch, the lagged params, the reference.
    extra_abstract = {"rollout": rollouts.abstract(), "lagged": [params_abstract] * rl.lag,
                      "reference": params_abstract if need_ref else None}
    restored = ckpt.restore_newest_intact(
        lambda step: ckpt.restore_with_extra(step, pieces.abstract_state(), cursor,
                                             extra_abstract), rename=True)
    if restored is None:
        state, start = first_state(pieces, ckpt), 0
        ref = _copy(state["params"]) if need_ref else None
        lagged = [_copy(state["params"]) for _ in range(rl.lag)]
        pending = rollouts.sample(0, lagged[0] if lagged else state["params"], ref)
        sampled = 1
    else:
        start, (state, tree) = restored
        pending, lagged, ref = tree["rollout"], list(tree["lagged"]), tree["reference"]
        sampled = 0  # the batch of step start + 1 came with the checkpoint
        print(f"resumed from step {start} in {run_dir} (with the rollout batch of step "
              f"{start + 1})", flush=True)
    update = jax.jit(pieces.traced_with_mesh(grpo.make_update_step(
        pieces.graphdef, pieces.tx, pieces.lr_fn, rl, pieces.loss_chunk)),
        in_shardings=(pieces.state_shardings, pieces.batch_sharding),
        out_shardings=(pieces.state_shardings, replicated(pieces.mesh)), donate_argnums=0)
    summary_path = run_dir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    # rollout_batches: sampled over the run's starts (a resume samples none twice).
    summary = {"status": "running", "steps": start, "task": rl.task,
               "first_reward_mean": previous.get("first_reward_mean"),
               "rollout_batches": previous.get("rollout_batches", 0) + sampled}
    write_json(summary_path, summary)
    sink = MetricsSink(run_dir, cfg, resume_step=start, enabled=jax.process_index() == 0)
    faults = Faults(ckpt.wait)
    print(f"lm rl: {rl.task} (size {rl.size}), {rl.prompts} prompts x {rl.group} samples, "
          f"{rl.updates_per_batch} update(s) per batch, lag {rl.lag}, kl_weight "
          f"{rl.kl_weight:g}, {rl.loss_mean}-level mean; steps {start} -> {cfg.steps}",
          flush=True)
    code, status, window = EXIT_OK, "completed", []
    try:
        with StopFlag(cfg.stop_sync_every) as stop:
            for s in range(start, cfg.steps):
                step = s + 1
                gen_seconds = float(pending["gen_seconds"])
                roll = rollout_metrics(pending, rl.group)
                t0 = time.perf_counter()
                batch = {k: pending[k] for k in ROLLOUT_KEYS}
                per_update = []
                for u in range(rl.updates_per_batch):
                    state, m = update(state, batch)
                    if u == 0:
                        faults.dispatched(step)
                    per_update.append(m)
                per_update = jax.device_get(per_update)
                learn_seconds = time.perf_counter() - t0
                if not all(bool(m["finite"]) for m in per_update):
                    status, code = f"diverged at step {step}", EXIT_DIVERGED
                    print(f"step {step}: non-finite loss or parameters; stopping", flush=True)
                    break
                if step < cfg.steps:  # B_{step+1}, sampled by the params after step - k
                    sampler = lagged[0] if rl.lag else state["params"]
                    pending = rollouts.sample(s + 1, sampler, ref)
                    summary["rollout_batches"] += 1
                if rl.lag:  # lagged: the params after steps step-k+1 .. step
                    lagged = lagged[1:] + [_copy(state["params"])]
                # (after the last step, its own batch is saved again: the tree's shape)
                total = gen_seconds + learn_seconds
                first = per_update[0]
                metrics = {**roll, "loss": float(first["loss"]),
                           "loss_last_update": float(per_update[-1]["loss"]),
                           "clip_fraction": float(np.mean([m["clip_fraction"]
                                                           for m in per_update])),
                           "ratio_mean": float(first["ratio_mean"]),  # 1 on-policy
                           "grad_norm": float(first["grad_norm"]), "lr": float(first["lr"]),
                           "gen_seconds": gen_seconds, "learn_seconds": learn_seconds,
                           "gen_share": gen_seconds / total, "learn_share": learn_seconds / total}
                if "kl" in first:
                    metrics["kl"] = float(np.mean([m["kl"] for m in per_update]))
                sink.write(step, metrics)
                window.append(metrics)
                if summary["first_reward_mean"] is None:
                    summary["first_reward_mean"] = roll["reward_mean"]
                if step % cfg.log_every == 0 or step == cfg.steps:
                    print(_log_line(step, cfg.steps, window), flush=True)
                    window = []
                signum = stop.requested(step)
                summary.update(steps=step, reward_mean=roll["reward_mean"])
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or signum:
                    cursor.step = step
                    ckpt.save(step, state, cursor, force=True,
                              extra={"rollout": pending, "lagged": lagged, "reference": ref})
                faults.settled(step)
                if signum:
                    status, code = f"stopped by signal {signum} after step {step}", \
                        exit_for_signal(signum)
                    break
    finally:
        ckpt.close()
        summary["status"] = status
        write_json(summary_path, summary)
        sink.close(summary)
    print(f"lm rl: {status}", flush=True)
    return code
