"""GRPO's pieces (lm/post/grpo.py) against hand computations, and the synthetic tasks'
checkers (lm/post/rl_tasks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.errors import ConfigError
from lm.post import grpo, rl_tasks
from lm.post.rl_tasks import Problem


def test_advantages_are_zero_for_a_group_whose_rewards_agree():
    rewards = np.array([[1.0, 1.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 1.0]])
    adv = grpo.group_advantages(rewards)
    assert (adv[:2] == 0).all()
    np.testing.assert_allclose(adv[2], [-1, 1, -1, 1], atol=1e-5)  # mean 0.5, std 0.5
    # Normalised per group: the scale of the rewards does not matter.
    np.testing.assert_allclose(grpo.group_advantages(rewards * 10)[2], adv[2], atol=1e-5)


def test_clipped_objective_equals_a_hand_computed_case():
    eps = 0.2
    # One completion, four tokens: ratios inside and outside the clip range, with
    # positive and negative advantages.
    ratio = np.array([[1.1, 1.5, 0.5, 0.7]], np.float32)
    adv = np.array([[2.0, 2.0, -1.0, 3.0]], np.float32)
    old = np.log(np.array([[0.5, 0.2, 0.4, 0.1]], np.float32))
    logp = old + np.log(ratio)
    mask = np.ones_like(ratio)
    loss, stats = grpo.grpo_loss(jnp.asarray(logp), old, adv, mask, eps)
    # Per token -min(ρA, clip(ρ)A):
    #   1.1 * 2 = 2.2 vs 1.1 * 2 -> -2.2;   1.5 * 2 = 3 vs 1.2 * 2 = 2.4 -> -2.4
    #   0.5 * -1 = -0.5 vs 0.8 * -1 = -0.8 -> 0.8;   0.7 * 3 = 2.1 vs 0.8 * 3 = 2.4 -> -2.1
    expected = np.array([-2.2, -2.4, 0.8, -2.1])
    assert float(loss) == pytest.approx(expected.mean(), rel=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(0.5)  # tokens 2 and 3 cut off
    # Masked tokens count for nothing; sequence-level: each completion's token mean.
    mask2 = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    logp2, old2, adv2 = (np.concatenate([x, x]) for x in (logp, old, adv))
    tok, _ = grpo.grpo_loss(jnp.asarray(logp2), old2, adv2, mask2, eps)
    seq, _ = grpo.grpo_loss(jnp.asarray(logp2), old2, adv2, mask2, eps, loss_mean="sequence")
    assert float(tok) == pytest.approx((-2.2 - 2.4 - 2.2) / 3, rel=1e-5)
    assert float(seq) == pytest.approx(((-2.2 - 2.4) / 2 - 2.2) / 2, rel=1e-5)


def test_k3_kl_penalty_is_added_with_its_weight():
    logp = np.log(np.array([[0.5, 0.25]], np.float32))
    ref = np.log(np.array([[0.25, 0.25]], np.float32))
    zero = np.zeros_like(logp)
    mask = np.ones_like(logp)
    loss, stats = grpo.grpo_loss(jnp.asarray(logp), logp, zero, mask, 0.2, ref, 0.5)
    d = np.log(0.5)  # ref - logp of token 0; token 1: 0
    k3 = np.array([np.exp(d) - d - 1, 0.0])
    assert float(stats["kl"]) == pytest.approx(k3.mean(), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * k3.mean(), rel=1e-5)


def _policy_logp(w, x_BTD, actions_BT):
    """A log-linear policy over 5 actions: a stand-in for the model's log-probs."""
    logits = x_BTD @ w
    return jnp.take_along_axis(jax.nn.log_softmax(logits), actions_BT[..., None], -1)[..., 0]


def test_one_update_without_kl_is_reinforce_with_a_group_mean_baseline():
    rng = np.random.default_rng(0)
    p, g, t, d = 3, 4, 5, 6
    w = jnp.asarray(rng.normal(size=(d, 5)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(p * g, t, d)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, 5, (p * g, t)))
    mask = (rng.random((p * g, t)) < 0.8).astype(np.float32)
    rewards = rng.integers(0, 2, (p, g)).astype(np.float32)
    rewards[0] = 1.0  # a group with no signal
    adv = np.repeat(grpo.group_advantages(rewards).reshape(-1, 1), t, 1) * mask
    old = _policy_logp(w, x, actions)  # one update per batch: π_old = π, ρ = 1

    def grpo_objective(w):
        return grpo.grpo_loss(_policy_logp(w, x, actions), old, adv, mask, 0.2)[0]

    def reinforce(w):  # -mean over tokens of A ∇log π, A = (r - group mean) / std
        return -jnp.sum(adv * _policy_logp(w, x, actions) * mask) / jnp.sum(mask)

    np.testing.assert_allclose(jax.grad(grpo_objective)(w), jax.grad(reinforce)(w),
                               rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.grad(grpo_objective)(w)).max()) > 0


def test_neither_the_reference_nor_the_sampling_policy_gets_a_gradient():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(np.log(rng.random((2, 3)) + 0.1), jnp.float32)
    old = logp + 0.05
    ref = logp - 0.3
    adv = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    mask = jnp.ones((2, 3))
    g_old, g_ref = jax.grad(lambda o, r: grpo.grpo_loss(logp, o, adv, mask, 0.2, r, 0.1)[0],
                            argnums=(0, 1))(old, ref)
    assert float(jnp.abs(g_old).max()) == 0 and float(jnp.abs(g_ref).max()) == 0
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, old, adv, mask, 0.2, ref, 0.1)[0])(logp)
    assert float(jnp.abs(g).max()) > 0


def test_task_checkers_on_hand_cases():
    add = Problem("12+34=", "46")
    assert rl_tasks.exact_reward(add, "46") == 1.0
    assert rl_tasks.exact_reward(add, " 46\nrest") == 1.0  # up to the newline, stripped
    assert rl_tasks.exact_reward(add, "47") == 0.0
    assert rl_tasks.exact_reward(add, "460") == 0.0
    assert rl_tasks.exact_reward(add, "") == 0.0
    regex = rl_tasks.reward_function("regex:^{answer}\\b")
    assert regex(add, "46 is it") == 1.0 and regex(add, "x46") == 0.0
    assert regex(Problem("1+0=", "1"), "1.") == 1.0
    # The tasks' answers are right.
    for p in rl_tasks.problems("addition", 2, 0, 0, 20):
        a, b = p.prompt[:-1].split("+")
        assert p.answer == str(int(a) + int(b))
    for p in rl_tasks.problems("sort", 4, 0, 0, 20):
        digits = p.prompt[len("sort:"):-1]
        assert len(digits) == 4 and p.answer == "".join(sorted(digits))
    for p in rl_tasks.problems("reverse", 5, 0, 0, 20):
        assert p.answer == p.prompt[len("reverse:"):-1][::-1]
    # Drawn by (seed, step): the same problems again, others at another step.
    assert rl_tasks.problems("addition", 2, 3, 7, 8) == rl_tasks.problems("addition", 2, 3, 7, 8)
    assert rl_tasks.problems("addition", 2, 3, 7, 8) != rl_tasks.problems("addition", 2, 3, 8, 8)


def test_reward_specs_and_a_failing_reward_function(tmp_path):
    f = tmp_path / "rw.py"
    f.write_text("def length(prompt, completion):\n    return len(completion)\n"
                 "def boom(prompt, completion):\n    raise KeyError('x')\n")
    length = rl_tasks.reward_function(f"{f}:length")
    assert length(Problem("1+1=", "2"), "abc") == 3
    boom = rl_tasks.reward_function(f"{f}:boom")
    with pytest.raises(rl_tasks.RewardError, match=r"prompt '1\+1='"):
        rl_tasks.score(boom, Problem("1+1=", "2"), "2")
    with pytest.raises(ConfigError, match="defines no function 'nope'"):
        rl_tasks.reward_function(f"{f}:nope")
    with pytest.raises(ConfigError, match="expected exact"):
        rl_tasks.reward_function("fuzzy")
    with pytest.raises(ConfigError, match="not a regular expression"):
        rl_tasks.reward_function("regex:(")


@pytest.mark.parametrize("override, match", [
    ("rl.temperature=0", "rl.temperature must be > 0"),
    ("rl.group=0", "rl.group must be >= 1"),
    ("rl.clip_eps=1.5", "rl.clip_eps must be in"),
    ("rl.lag=-1", "rl.lag must be >= 0"),
    ("rl.task=multiply", "rl.task"),
])
def test_bad_rl_settings_are_config_errors(override, match):
    from lm.config import TrainConfig, apply_overrides, validate
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(TrainConfig(), [override]))
