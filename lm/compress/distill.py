"""Knowledge distillation (Hinton et al. 2015): the `distill` config section and the
per-token distillation loss. `lm train --distill-from TEACHER` sets `distill.teacher`.

The student's loss is

    loss = (1 - weight) * CE(data) + weight * T^2 * KL_T + z-loss + mixers' aux losses

KL_T is taken between the teacher's and the student's next-token distributions at
temperature T (softmax(logits / T)): `forward_kl` = KL(teacher || student) (Hinton's
soft targets: mass-covering), `reverse_kl` = KL(student || teacher) (mode-seeking, as in
MiniLLM). The T^2 factor keeps the soft targets' gradient magnitude independent of T
(the gradient of KL_T with respect to the student's logits scales as 1 / T^2). It is
averaged over the tokens the data loss counts (loss_mask). weight and temperature are
traced scalars (batched trials may differ in them).

The teacher (lm/compress/teacher.py) is frozen: its parameters reach the step as an
argument of their own, never differentiated and never in the optimizer's state.

This module imports nothing of lmlab beyond the schema and errors: lm.config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from lm.errors import ConfigError
from lm.schema import knob

TRACED = {"traced"}


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (lm/compress/distill.py)."""
    teacher: str = knob(
        "", doc="The teacher: an lmlab run dir (its newest intact checkpoint, pinned at the "
                "first start in RUN/distill_teacher.json) or a Hugging Face model dir; \"\" "
                "= no distillation. `lm train --distill-from` sets it. Its tokenizer and "
                "vocabulary must be the student's.")
    weight: float = knob(
        0.5, roles=TRACED,
        doc="loss = (1 - weight) * data cross-entropy + weight * T^2 * KL at temperature "
            "T (1 = the teacher's distribution alone).")
    temperature: float = knob(
        1.0, roles=TRACED, doc="T: both distributions are softmax(logits / T); the KL is "
                               "scaled by T^2 (Hinton et al. 2015).")
    kind: Literal["forward_kl", "reverse_kl"] = knob(
        "forward_kl", doc="forward_kl = KL(teacher || student) (soft targets, "
                          "mass-covering); reverse_kl = KL(student || teacher) "
                          "(mode-seeking).")


def validate(cfg: DistillConfig) -> None:
    if not 0.0 <= cfg.weight <= 1.0:
        raise ConfigError(f"distill.weight must be in [0, 1], got {cfg.weight}")
    if cfg.temperature <= 0:
        raise ConfigError(f"distill.temperature must be positive, got {cfg.temperature}")


def enabled(cfg: DistillConfig) -> bool:
    return bool(cfg.teacher)


def kd_per_token(student_logits_BTV, teacher_logits_BTV, temperature, kind: str):
    """T^2 * KL at temperature T per position [B, T] (float32): forward_kl =
    KL(teacher || student), reverse_kl = KL(student || teacher). No gradient reaches
    the teacher's logits."""
    t = jnp.asarray(temperature, jnp.float32)
    s_logp = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / t, axis=-1)
    t_logp = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_BTV).astype(jnp.float32) / t, axis=-1)
    if kind == "forward_kl":
        kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    elif kind == "reverse_kl":
        kl = jnp.sum(jnp.exp(s_logp) * (s_logp - t_logp), axis=-1)
    else:
        raise ValueError(f"unknown distill.kind {kind!r}")
    return kl * t * t


def mixed_loss(ce, kd, weight):
    """(1 - weight) * data loss + weight * distillation loss."""
    w = jnp.asarray(weight, jnp.float32)
    return (1.0 - w) * ce + w * kd
