"""`lm rl` end to end: GRPO on the addition task from a tiny run SFT'd (`lm train`) on
the task's format raises the reward; a run stopped after step k and resumed repeats
the uninterrupted run's rollouts and losses; a reward function that raises is one line
naming the prompt, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import lm, sets

pytestmark = pytest.mark.slow  # every test here runs `lm` end to end

POLICY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
          "data.seq_len=32", "tensorboard=false"]
RL = [*POLICY, "optim.warmup_steps=0", "optim.decay_fraction=0", "checkpoint_every=1000",
      "rl.prompts=8", "rl.group=8"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny policy trained briefly on 1-digit additions (the format, and part of the
    answers)."""
    root = tmp_path_factory.mktemp("rl")
    data = root / "addition.jsonl"
    wrote = lm("rl", "--write-sft", str(data), "--sft-records", "3000", *sets("rl.size=1"))
    assert wrote.returncode == 0, wrote.stderr[-2000:]
    run = root / "sft"
    result = lm("train", "--run-dir", str(run), *sets(
        *POLICY, f"data.corpus={data}", "data.format=instruction", "batch_size=16",
        "steps=150", "log_every=50", "eval_every=150", "eval_batches=2",
        "checkpoint_every=150", "optim.warmup_steps=10", "optim.lr=3e-3"))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _records(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def test_grpo_raises_the_reward_on_addition(sft_run, tmp_path):
    run = tmp_path / "grpo"
    result = lm("rl", "--init-from", str(sft_run), "--run-dir", str(run),
                *sets(*RL, "steps=240", "log_every=40", "optim.lr=3e-4"))
    assert result.returncode == 0, result.stderr[-2000:]
    rec = _records(run)
    assert sorted(rec) == list(range(1, 241))
    reward = np.array([rec[s]["reward_mean"] for s in range(1, 241)])
    before, after = reward[:40].mean(), reward[-40:].mean()
    print(f"reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.05, (before, after)
    for key in ("reward_std", "completion_len_mean", "clip_fraction", "gen_share",
                "learn_share", "gen_seconds", "learn_seconds", "no_signal_groups"):
        assert key in rec[1]
    assert "kl" not in rec[1]  # kl_weight 0: no reference computed
    summary = json.loads((run / "summary.json").read_text())  # as lm train writes it
    assert summary["status"] == "completed" and summary["steps"] == 240
    # an ordinary run: lm generate reads its checkpoint (the rollouts are kept apart)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "3+4="}\n')
    gen = lm("generate", "--run", str(run), "--in", str(prompts), "--out",
             str(tmp_path / "o.jsonl"), "--temperature", "0", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr[-2000:]


KEYS = ("reward_mean", "reward_std", "completion_len_mean", "loss", "loss_last_update",
        "grad_norm", "clip_fraction", "kl")


def test_a_resumed_run_repeats_the_uninterrupted_rollouts_and_losses(sft_run, tmp_path):
    # Two updates per batch, a lag of one step and a KL penalty: every piece of state a
    # resume needs (optimizer, pending rollout, lagged params, reference).
    args = [*RL, "steps=8", "log_every=2", "optim.lr=1e-3", "rl.updates_per_batch=2",
            "rl.lag=1", "rl.kl_weight=0.05"]
    full = tmp_path / "full"
    result = lm("rl", "--init-from", str(sft_run), "--run-dir", str(full), *sets(*args))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "resumed"
    first = lm("rl", "--init-from", str(sft_run), "--run-dir", str(run), *sets(*args),
               env={"LMLAB_FAULT": "sigterm@3"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    assert sorted(_records(run)) == [1, 2, 3]
    second = lm("rl", "--init-from", str(sft_run), "--run-dir", str(run), *sets(*args))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 3" in second.stdout
    a, b = _records(full), _records(run)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert {k: a[step][k] for k in KEYS} == {k: b[step][k] for k in KEYS}, step
    # The batch pending at the stop came back with the checkpoint: none sampled twice.
    summaries = [json.loads((r / "summary.json").read_text()) for r in (full, run)]
    assert [s["rollout_batches"] for s in summaries] == [8, 8]
    # Lag 1: B_1 and B_2 are both the initial policy's samples; the learner has moved
    # by step 2 (ratio off 1), not at step 1.
    assert a[1]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(a[2]["ratio_mean"] - 1.0) > 1e-4
    assert a[8]["kl"] > 0 and any(a[s]["clip_fraction"] > 0 for s in a)


def test_a_reward_function_that_raises_is_one_line_naming_the_prompt(sft_run, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def score(prompt, completion):\n    return {}['missing']\n")
    args = [*RL, "steps=2", f"rl.reward={reward}:score"]
    result = lm("rl", "--init-from", str(sft_run), "--run-dir", str(tmp_path / "bad"),
                *sets(*args))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "reward function failed on prompt '" in lines[0], lines
    assert "Traceback" not in result.stderr
    skipped = lm("rl", "--init-from", str(sft_run), "--run-dir", str(tmp_path / "skip"),
                 *sets(*args, "rl.skip_bad_rewards=true"))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert _records(tmp_path / "skip")[1]["bad_rewards"] == 64
