"""Preference optimisation: the `objective` knob's DPO-family choices, the `preference`
config section and their losses. `lm train --init-from POLICY --set objective=dpo
--set data.preferences=PAIRS.jsonl` trains on pairs (lm/post/pairs.py).

Every loss is on sequence log-probs: pi_c, pi_r = the sum over the response tokens of
log p(token) under the policy for the chosen and the rejected completion of a pair
(|c|, |r| their token counts); ref_c, ref_r the same under the reference.

    dpo    (Rafailov et al. 2023)  h = (pi_c - ref_c) - (pi_r - ref_r)
           loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
           (eps = label_smoothing: the conservative / robust DPO of noisy labels)
    simpo  (Meng et al. 2024)      loss = -log sigma(beta (pi_c/|c| - pi_r/|r|) - gamma)
           (no reference; length_normalize=false uses the sums pi_c - pi_r)
    orpo   (Hong et al. 2024)      p = pi / |.| (mean token log-prob), log odds = p -
           log(1 - e^p); loss = -p_c + lambda * -log sigma(log odds_c - log odds_r)
           (no reference; the SFT term is the chosen completion's mean token NLL)

The loss is the mean over the step's pairs. Metrics (per step, means over pairs):
`loss`, `reward_margin` (dpo: beta h; simpo: beta times the (normalised) log-prob gap;
orpo: the log odds ratio), `reward_accuracy` (the share of pairs whose margin > 0: the
implicit reward prefers the chosen completion), `logp_chosen`, `logp_rejected` (the
policy's summed log-probs). beta, label_smoothing, gamma and orpo_lambda are traced
scalars: batched trials (lm/train/trials.py) sweep them in one program.

The DPO reference is the frozen initial policy, computed in the same step on the same
batch under the same mesh (a second forward under stop_gradient; the frozen-model
machinery of distillation: its params are a step argument of their own, no optimizer
state, lm/compress/teacher.py), not precomputed into a store: nothing can go stale when
the data, seq_len or tokenizer change or a run resumes, and nothing is written; it costs
one forward per step (a third of a step's FLOPs). With LoRA the reference is the frozen
base without its adapters, run from the same params: no second copy of the weights.

The seam for a further objective (GRPO): a name for `objective`, a per-pair (or
per-group) loss beside `pair_losses`, a batch source beside lm/post/pairs.py; the step
(`lm.train.step.make_train_step(..., objective=Objective)`) calls `objective_sums`.

This module imports nothing of lmlab beyond the schema and errors: lm.config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.errors import ConfigError
from lm.schema import knob

TRACED = {"traced"}
PAIRWISE = ("dpo", "simpo", "orpo")  # the objectives trained on preference pairs
OBJECTIVES = ("lm", *PAIRWISE)


@dataclass(frozen=True)
class PreferenceConfig:
    """Preference optimisation's coefficients (objective=dpo|simpo|orpo; lm/post)."""
    beta: float = knob(
        0.1, roles=TRACED,
        doc="beta: dpo's KL strength (the reward is beta times the log-ratio to the "
            "reference; 0.1 in Rafailov et al.); simpo's reward scale (2 to 2.5 in Meng "
            "et al.).")
    label_smoothing: float = knob(
        0.0, roles=TRACED,
        doc="dpo: eps, the assumed share of flipped labels: loss = -(1 - eps) log "
            "sigma(beta h) - eps log sigma(-beta h) (0 = plain DPO).")
    gamma: float = knob(
        0.5, roles=TRACED,
        doc="simpo: the target reward margin gamma: loss = -log sigma(beta * gap - gamma).")
    length_normalize: bool = knob(
        True, doc="simpo: the reward is the mean token log-prob (SimPO's); false = the "
                  "summed log-prob.")
    orpo_lambda: float = knob(
        0.1, roles=TRACED,
        doc="orpo: lambda, the weight of the odds-ratio term beside the chosen "
            "completion's NLL (0.1 in Hong et al.).")


def validate(cfg: PreferenceConfig) -> None:
    if cfg.beta <= 0:
        raise ConfigError(f"preference.beta must be positive, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"preference.label_smoothing must be in [0, 0.5), got "
                          f"{cfg.label_smoothing}")
    if cfg.orpo_lambda < 0:
        raise ConfigError(f"preference.orpo_lambda must be >= 0, got {cfg.orpo_lambda}")


def describe(cfg) -> str:
    """One line: a run's (TrainConfig's) preference objective and its coefficients."""
    p, kind = cfg.preference, cfg.objective
    coeffs = {"dpo": f"beta={p.beta:g}, label_smoothing={p.label_smoothing:g}, reference: "
                     + ("the LoRA base (adapters off)" if cfg.lora.rank else
                        "the frozen initial policy"),
              "simpo": f"beta={p.beta:g}, gamma={p.gamma:g}, "
                       f"{'length-normalised' if p.length_normalize else 'summed'} log-probs",
              "orpo": f"lambda={p.orpo_lambda:g}"}[kind]
    return (f"objective {kind} on pairs of {cfg.data.preferences} "
            f"({cfg.batch_size // 2} pairs per step): {coeffs}")


def needs_reference(objective: str) -> bool:
    return objective == "dpo"


class Objective(NamedTuple):
    """What the train step needs of a non-LM objective (built once per step program).
    kind: the `objective` name; cfg: its section (traced scalars in a batched group);
    reference: "argument" (frozen params: the step's third argument), "lora_base" (the
    run's own frozen LoRA base, adapters off) or None (no reference); base_graphdef: the
    base Transformer's graph (lora_base)."""
    kind: str
    cfg: PreferenceConfig
    reference: str | None = None
    base_graphdef: object = None


def pair_losses(kind: str, cfg: PreferenceConfig, pi_c, pi_r, n_c, n_r,
                ref_c=None, ref_r=None):
    """(loss, margin) per pair ([P] float32) of `kind` from the policy's summed response
    log-probs (pi_c, pi_r), their token counts (n_c, n_r, > 0) and, for dpo, the
    reference's (ref_c, ref_r). margin > 0: the implicit reward prefers the chosen."""
    beta = jnp.asarray(cfg.beta, jnp.float32)
    if kind == "dpo":
        h = (pi_c - ref_c) - (pi_r - ref_r)
        eps = jnp.asarray(cfg.label_smoothing, jnp.float32)
        z = beta * h
        loss = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
        return loss, z
    if kind == "simpo":
        gap = pi_c / n_c - pi_r / n_r if cfg.length_normalize else pi_c - pi_r
        z = beta * gap
        return -jax.nn.log_sigmoid(z - jnp.asarray(cfg.gamma, jnp.float32)), z
    if kind == "orpo":
        p_c, p_r = pi_c / n_c, pi_r / n_r

        def log_odds(p):  # log(p / (1 - p)) of the probability e^p; -expm1 is stable near 0
            p = jnp.minimum(p, -1e-6)
            return p - jnp.log(-jnp.expm1(p))
        ratio = log_odds(p_c) - log_odds(p_r)
        lam = jnp.asarray(cfg.orpo_lambda, jnp.float32)
        return -p_c - lam * jax.nn.log_sigmoid(ratio), ratio
    raise ValueError(f"unknown preference objective {kind!r}")


def sequence_logps(nll_BT, mask_BT):
    """Rows laid out as pairs (row 2i chosen, 2i + 1 rejected) -> (pi_c, pi_r, n_c, n_r),
    each [P]: the summed log-probs of the response tokens and their counts."""
    logp = -jnp.sum(nll_BT * mask_BT, axis=-1).reshape(-1, 2)
    n = jnp.sum(mask_BT, axis=-1).reshape(-1, 2)
    return logp[:, 0], logp[:, 1], n[:, 0], n[:, 1]


def valid_pairs(mask_BT):
    """[P] 1.0 where both rows of the pair have response tokens (0: a padding pair)."""
    n = jnp.sum(mask_BT, axis=-1).reshape(-1, 2)
    return ((n[:, 0] > 0) & (n[:, 1] > 0)).astype(jnp.float32)


def preference_stats(kind, cfg, nll_BT, mask_BT, pair_denom, ref_nll_BT=None) -> dict:
    """The objective's sums over the pairs of a (micro)batch, each divided by
    `pair_denom` (the step's pair count: microbatch sums add up to step means). Padding
    pairs (no response tokens) count nowhere."""
    pi_c, pi_r, n_c, n_r = sequence_logps(nll_BT, mask_BT)
    valid = valid_pairs(mask_BT)
    safe_c, safe_r = jnp.maximum(n_c, 1.0), jnp.maximum(n_r, 1.0)
    ref_c = ref_r = None
    if ref_nll_BT is not None:
        ref_c, ref_r, _, _ = sequence_logps(jax.lax.stop_gradient(ref_nll_BT), mask_BT)
    loss, margin = pair_losses(kind, cfg, pi_c, pi_r, safe_c, safe_r, ref_c, ref_r)

    def mean(x):
        return jnp.sum(jnp.where(valid > 0, x, 0.0)) / pair_denom
    return {"loss": mean(loss), "reward_margin": mean(margin),
            "reward_accuracy": mean((margin > 0).astype(jnp.float32)),
            "logp_chosen": mean(pi_c), "logp_rejected": mean(pi_r)}


__all__ = ["PreferenceConfig", "Objective", "PAIRWISE", "OBJECTIVES", "validate",
           "needs_reference", "valid_pairs", "pair_losses", "sequence_logps", "preference_stats"]
