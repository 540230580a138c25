"""GRPO (Shao et al. 2024, DeepSeekMath): the group-normalised advantages, the clipped
policy-gradient loss with an optional KL penalty to a reference, and the jitted pieces
`lm rl` runs (lm/post/rl.py): per-token log-probs of a rollout batch, and one optimizer
update on it.

For completion token t of sample i (prompt p, group of G samples of p):

    A_i   = (r_i - mean_g r) / (std_g r + eps)       (0 for a group whose rewards agree)
    ρ_it  = π(t) / π_old(t)                           π_old: the sampling policy
    loss  = -min(ρ A, clip(ρ, 1-ε, 1+ε) A) + β (exp(ref - logπ) - (ref - logπ) - 1)

the last term the k3 estimator of KL(π || ref) (Schulman 2020), β = rl.kl_weight (0: no
reference at all, as DAPO). The mean is over every completion token of the batch
(rl.loss_mean=token, DAPO) or over completions of each one's token mean (sequence,
GRPO's). π_old and ref are inputs (computed once per rollout batch, never
differentiated): the reference's parameters never enter the update. With one update per
batch ρ = 1 and, with β = 0, the gradient is REINFORCE's with the group mean as baseline,
-mean(A ∇logπ) (tests/unit/test_grpo.py).

The batch rows (lm/post/rl.py `Rollout`) are the usual training rows (inputs, targets,
positions, segment_ids, loss_mask: 1 on completion tokens, the stop token included) plus
"old_logp", "ref_logp" and "advantage" per token ([B, T]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.train.step import _all_finite, token_losses

ADV_EPS = 1e-6  # std_g + eps: a group of nearly equal rewards does not blow up


def group_advantages(rewards_PG: np.ndarray, eps: float = ADV_EPS) -> np.ndarray:
    """(r - group mean) / (group std + eps) per prompt row; exactly 0 for a group whose
    rewards are all equal (no signal: no update from it)."""
    r = np.asarray(rewards_PG, np.float64)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    adv = (r - mean) / (std + eps)
    same = (r == r[:, :1]).all(axis=1, keepdims=True)
    return np.where(same, 0.0, adv).astype(np.float32)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(π || ref): exp(d) - d - 1, d = ref - logπ (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip_eps, ref_logp_BT=None,
              kl_weight=0.0, loss_mean: str = "token"):
    """(loss, stats) of the clipped objective (+ β k3 when ref_logp is given). The
    sampling policy's and the reference's log-probs are constants (stop_gradient)."""
    old = jax.lax.stop_gradient(old_logp_BT)
    adv = jax.lax.stop_gradient(adv_BT)
    ratio = jnp.exp(logp_BT - old)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp_BT is not None:
        kl = k3_kl(logp_BT, jax.lax.stop_gradient(ref_logp_BT))
        per_token = per_token + kl_weight * kl
    mask = mask_BT.astype(jnp.float32)
    n_tokens = jnp.maximum(jnp.sum(mask), 1.0)

    def mean(x_BT):
        if loss_mean == "token":
            return jnp.sum(x_BT * mask) / n_tokens
        per_seq = jnp.sum(x_BT * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        has = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)

    # Tokens whose clipped branch is the minimum (their gradient is cut off).
    cut = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    stats = {"clip_fraction": jnp.sum(cut * mask) / n_tokens,
             "ratio_mean": jnp.sum(ratio * mask) / n_tokens}
    if kl is not None:
        stats["kl"] = jnp.sum(kl * mask) / n_tokens
    return mean(per_token), stats


def logprobs(graphdef, params, batch, loss_chunk: int = 0):
    """log π(target) per position [B, T] (0 where loss_mask is 0)."""
    nll = token_losses(graphdef, params, batch, loss_chunk)[0]
    return -nll * batch["loss_mask"]


def make_update_step(graphdef, tx: optax.GradientTransformation, lr_fn, rl, loss_chunk: int = 0):
    """state = {"params", "opt_state", "step", "rng"}, batch -> (state, metrics): one
    optimizer step on the GRPO loss of a rollout batch (rl: the rl config section)."""
    use_ref = rl.kl_weight > 0

    def objective(params, batch):
        logp = logprobs(graphdef, params, batch, loss_chunk)
        return grpo_loss(logp, batch["old_logp"], batch["advantage"], batch["loss_mask"],
                         rl.clip_eps, batch["ref_logp"] if use_ref else None,
                         rl.kl_weight, rl.loss_mean)

    def update(state, batch):
        params = state["params"]
        (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = dict(stats, loss=loss, grad_norm=grad_norm, lr=lr_fn(state["step"]),
                       finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                       & _all_finite(new_params))
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                "rng": jax.random.fold_in(state["rng"], 1)}, metrics

    return update
