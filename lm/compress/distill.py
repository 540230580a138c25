"""Knowledge distillation: the `distill` config section and the distillation losses.
`lm train --distill-from TEACHER` sets `distill.teacher`.

The student's loss is

    loss = (1 - weight) * CE(data) + weight * T^2 * KL_T          (Hinton et al. 2015)
           + hidden_weight * hidden                                (TinyBERT)
           + relation_weight * relation                            (MiniLM)
           + z-loss + mixers' aux losses

KL_T is taken between the teacher's and the student's next-token distributions at
temperature T (softmax(logits / T)): `forward_kl` = KL(teacher || student) (Hinton's
soft targets: mass-covering), `reverse_kl` = KL(student || teacher) (mode-seeking, as in
MiniLLM). The T^2 factor keeps the soft targets' gradient magnitude independent of T
(the gradient of KL_T with respect to the student's logits scales as 1 / T^2). It is
averaged over the tokens the data loss counts (loss_mask). weight and temperature are
traced scalars (batched trials may differ in them), as are the other two weights.

`hidden`: the mean squared error between the residual streams after mapped layers, the
student's through a learned projection when the widths differ (`hidden_loss`; the
projection lives in the train state, `init_projection`). `relation`: MiniLM's Q-Q, K-K,
V-V relation KL at one layer pair (`relation_loss`). Which layers: a `Plan`.

The teacher (lm/compress/teacher.py) is frozen: its parameters reach the step as an
argument of their own, never differentiated and never in the optimizer's state.

This module imports nothing of lmlab beyond the schema and errors: lm.config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
    hidden_weight: float = knob(
        0.0, roles=TRACED,
        doc="Weight of the hidden-state loss (TinyBERT): the mean squared error between "
            "the student's residual stream after the layers of `hidden_layers`, mapped by "
            "a learned linear projection when the widths differ, and the teacher's; added "
            "to the loss. 0 = off.")
    hidden_layers: str = knob(
        "", doc="Student layer -> teacher layer pairs for the hidden-state loss, "
                "\"s:t,...\" (0-based; negative counts from the last), e.g. \"-1:-1\"; \"\" = "
                "every student layer i -> teacher layer (i + 1) * teacher_layers / "
                "student_layers - 1 (uniform, as TinyBERT).")
    relation_weight: float = knob(
        0.0, roles=TRACED,
        doc="Weight of MiniLM's attention-relation loss (Wang et al. 2020, 2021): the KL "
            "between the teacher's and the student's query-query, key-key and value-value "
            "relations (causal softmaxes of scaled dot products) at `relation_layers`, "
            "the heads' projections concatenated and split into `relation_heads`, so the "
            "head counts may differ. Added to the loss. 0 = off.")
    relation_layers: str = knob(
        "-1:-1", doc="The student layer and teacher layer of the relation loss, \"s:t\" "
                     "(0-based; negative counts from the last). Both must be attention "
                     "layers.")
    relation_heads: int = knob(
        0, doc="Relation heads R: each of Q, K, V (all heads concatenated) is split into R "
               "heads of width / R (must divide every such width of both models); 0 = "
               "the teacher's n_heads.")
    teacher_width: int = knob(
        0, doc="The teacher's d_model, filled from the teacher when training starts with "
               "hidden_weight > 0: the shape of the learned projection [student d_model, "
               "teacher_width] (none when the widths are equal). It lives in the train "
               "state beside the params (state[\"distill\"], Adam on the run's LR "
               "schedule), is checkpointed with it, and is not part of the model.")


def validate(cfg: DistillConfig) -> None:
    if not 0.0 <= cfg.weight <= 1.0:
        raise ConfigError(f"distill.weight must be in [0, 1], got {cfg.weight}")
    if cfg.temperature <= 0:
        raise ConfigError(f"distill.temperature must be positive, got {cfg.temperature}")
    if cfg.hidden_weight < 0:
        raise ConfigError(f"distill.hidden_weight must be >= 0, got {cfg.hidden_weight}")
    if cfg.teacher_width < 0:
        raise ConfigError(f"distill.teacher_width must be >= 0, got {cfg.teacher_width}")
    _parse_pairs(cfg.hidden_layers)
    if cfg.relation_weight < 0:
        raise ConfigError(f"distill.relation_weight must be >= 0, got {cfg.relation_weight}")
    if cfg.relation_heads < 0:
        raise ConfigError(f"distill.relation_heads must be >= 0, got {cfg.relation_heads}")
    if len(_parse_pairs(cfg.relation_layers)) != 1:
        raise ConfigError(f"distill.relation_layers={cfg.relation_layers!r} must be one "
                          "student:teacher pair")


def _parse_pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        s, sep, t = item.partition(":")
        try:
            out.append((int(s), int(t)))
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"distill.hidden_layers: {item!r} is not student:teacher "
                              "(e.g. \"1:3,-1:-1\")")
    return out


def hidden(cfg: DistillConfig) -> bool:
    """The hidden-state loss is on (a Python decision: hidden_weight > 0 in the config,
    whatever a batched trial's traced value)."""
    return bool(cfg.teacher) and cfg.hidden_weight > 0


def layer_pairs(cfg: DistillConfig, student_layers: int,
                teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """The (student layer, teacher layer) pairs of the hidden-state loss, 0-based."""
    pairs = _parse_pairs(cfg.hidden_layers) or [
        (i, max((i + 1) * teacher_layers // student_layers - 1, 0))
        for i in range(student_layers)]
    out = []
    for s, t in pairs:
        if not (-student_layers <= s < student_layers and -teacher_layers <= t < teacher_layers):
            raise ConfigError(f"distill.hidden_layers: {s}:{t} is out of range (the student "
                              f"has {student_layers} layers, the teacher {teacher_layers})")
        out.append((s % student_layers, t % teacher_layers))
    return tuple(out)


class Plan(NamedTuple):
    """Which layers the hidden-state and relation losses compare (from the config and
    the two models' depths; fixed when the step is built)."""
    hidden: tuple = ()  # (student layer, teacher layer) pairs; () = off
    relation: tuple | None = None  # (student layer, teacher layer, relation heads); None = off


def relations(cfg: DistillConfig) -> bool:
    """The attention-relation loss is on (a Python decision, as `hidden`)."""
    return bool(cfg.teacher) and cfg.relation_weight > 0


def relation_pair(cfg: DistillConfig, student_layers: int,
                  teacher_layers: int) -> tuple[int, int]:
    """(student layer, teacher layer) of the relation loss, 0-based."""
    (s, t), = _parse_pairs(cfg.relation_layers)
    if not (-student_layers <= s < student_layers and -teacher_layers <= t < teacher_layers):
        raise ConfigError(f"distill.relation_layers: {s}:{t} is out of range (the student "
                          f"has {student_layers} layers, the teacher {teacher_layers})")
    return s % student_layers, t % teacher_layers


def relation_loss(student_qkv, teacher_qkv, heads: int, mask_BT, segment_ids_BT, denom):
    """MiniLM(v2)'s self-attention relation loss: for each of Q, K, V ([B, T, W], all
    heads concatenated), split W into `heads` relation heads of width W / heads, take
    the causal (same-document, key <= query) softmax of their scaled dot products, and
    average KL(teacher relation || student relation) over the relation heads; masked
    mean over query tokens (`denom`: the step's token count), mean over Q, K, V. Only
    the concatenated width enters, so models whose heads split it differently give the
    same relations."""
    b, t = mask_BT.shape
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = (j <= i)[None, None] & (segment_ids_BT[:, None, :, None]
                                      == segment_ids_BT[:, None, None, :])

    def log_rel(a_BTW):
        a = a_BTW.astype(jnp.float32).reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
        scores = jnp.einsum("brid,brjd->brij", a, a) / jnp.sqrt(jnp.float32(a.shape[-1]))
        return jax.nn.log_softmax(jnp.where(visible, scores, -1e30), axis=-1)

    total = jnp.float32(0)
    for s, tt in zip(student_qkv, teacher_qkv):
        ls, lt = log_rel(s), jax.lax.stop_gradient(log_rel(tt))
        kl = jnp.sum(jnp.where(visible, jnp.exp(lt) * (lt - ls), 0.0), axis=-1)  # [B,R,T]
        total = total + jnp.sum(jnp.mean(kl, axis=1) * mask_BT) / denom
    return total / 3


def projection_shape(cfg: DistillConfig, student_width: int) -> tuple[int, int] | None:
    """[student d_model, teacher d_model] of the learned projection, or None (no
    hidden-state loss, or equal widths)."""
    if not hidden(cfg) or not cfg.teacher_width or cfg.teacher_width == student_width:
        return None
    return (student_width, cfg.teacher_width)


def projection_optimizer():
    """The projection's update direction: Adam's; the step scales it by the run's LR
    (its schedule at the step), so the state does not depend on the schedule."""
    return optax.scale_by_adam()


def init_projection(shape: tuple[int, int], key) -> dict:
    """{"params": {"proj": W [d_s, d_t] ~ N(0, 1 / d_s)}, "opt_state"}: a random
    projection that keeps the scale of the residual stream, and its Adam state."""
    w = jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(jnp.float32(shape[0]))
    params = {"proj": w}
    return {"params": params, "opt_state": projection_optimizer().init(params)}


def hidden_loss(student_h: list, teacher_h: list, proj, mask_BT, denom):
    """Mean over the layer pairs of the masked mean (over tokens; `denom`: the step's
    token count) of the per-token mean squared error, over the teacher's width, between
    the projected student hidden state and the teacher's (no gradient to the teacher)."""
    total = jnp.float32(0)
    for s_h, t_h in zip(student_h, teacher_h):
        s_h = s_h.astype(jnp.float32)
        if proj is not None:
            s_h = s_h @ proj["proj"].astype(jnp.float32)
        diff = s_h - jax.lax.stop_gradient(t_h).astype(jnp.float32)
        total = total + jnp.sum(jnp.mean(jnp.square(diff), -1) * mask_BT) / denom
    return total / max(len(student_h), 1)


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
