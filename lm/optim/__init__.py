"""Optimizers: one shared optax chain around a pluggable update direction.

    clip (optim.clip_norm) -> direction (optim.name: adamw, ...) -> LR schedule x muP
    multipliers, plus weight decay (coupled or independent), masked to matrices

Each direction lives in one file of this package: its config section (a frozen
dataclass, `optim.<name>`), `transform(section)` returning the optax transformation that
turns gradients into unit-scale update directions, and `mup_lr_scale(ratio)`: how the
hidden-matrix LR scales with width under muP (base_width / width for Adam-like
directions). It registers itself with `@register`; adding one = one file + its import
line at the bottom. The schedule is built here only (`schedule`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import optax

from lm.errors import ConfigError

if TYPE_CHECKING:
    from lm.config import ModelConfig, OptimConfig


class Direction:
    """An update direction (subclass, set the class attributes, `@register` it)."""
    name: ClassVar[str]
    Config: ClassVar[type]

    @staticmethod
    def transform(section) -> optax.GradientTransformation:
        raise NotImplementedError

    @staticmethod
    def validate(section) -> None:
        """Raise ConfigError (one line naming optim.<name>.<key>) for bad settings."""

    @staticmethod
    def mup_lr_scale(width_ratio: float) -> float:
        """Hidden-matrix LR multiplier under muP at base_width / width = width_ratio."""
        return width_ratio


DIRECTIONS: dict[str, type[Direction]] = {}


def register(cls):
    if cls.name in DIRECTIONS:
        raise ValueError(f"optimizer {cls.name!r} is registered twice")
    if not (dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen):
        raise TypeError(f"optimizer {cls.__name__}: Config must be a frozen dataclass")
    DIRECTIONS[cls.name] = cls
    return cls


def all_directions() -> list[type[Direction]]:
    return list(DIRECTIONS.values())


def validate(cfg: "OptimConfig") -> None:
    if cfg.name not in DIRECTIONS:
        raise ConfigError(f"optim.name={cfg.name!r}: expected one of {', '.join(DIRECTIONS)}")
    DIRECTIONS[cfg.name].validate(getattr(cfg, cfg.name))


def schedule(cfg: "OptimConfig", total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Learning rate at a step: linear warmup, then cosine | linear | constant | wsd
    (warmup-stable-decay: constant, then a linear decay over the last decay_fraction)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = cfg.warmup_steps
    last = total_steps - 1  # the final step trains at the floor LR
    # jnp, not Python, arithmetic on the knobs: batched trials pass them traced
    # (lm/train/trials.py).
    decay_steps = jnp.maximum(last - warmup, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum((step + 1) / jnp.maximum(warmup, 1), 1.0)
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            after = peak + (floor - peak) * frac
        elif cfg.schedule == "constant":
            after = jnp.asarray(peak, jnp.float32)
        else:  # wsd
            decay_len = max(int(cfg.decay_fraction * total_steps), 1)
            start = last - decay_len
            d = jnp.clip((step - start) / decay_len, 0.0, 1.0)
            after = peak + (floor - peak) * d
        return jnp.where(step < warmup, warm, after)

    return lr


def _per_layer(axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if a != "layers")


def is_hidden_matrix(axes: tuple[str, ...]) -> bool:
    """Matrices whose fan-in grows with width (everything >= 2-D but the vocab tables)."""
    axes = _per_layer(axes)
    return len(axes) >= 2 and "vocab" not in axes


def lr_multipliers(axes_tree: Any, cfg: "ModelConfig", direction: str = "adamw") -> Any:
    """Per-parameter LR multipliers: muP scales hidden-matrix LRs by the direction's
    rule (base_width/width for Adam); standard parametrisation uses 1 everywhere."""
    ratio = cfg.mup_base_width / cfg.d_model if cfg.init == "mup" else 1.0
    ratio = DIRECTIONS[direction].mup_lr_scale(ratio) if ratio != 1.0 else 1.0
    return jax.tree.map(lambda axes: ratio if is_hidden_matrix(axes) else 1.0, axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def decay_mask(axes_tree: Any) -> Any:
    """Weight decay applies to matrices, not to norm scales and biases."""
    return jax.tree.map(lambda axes: len(_per_layer(axes)) >= 2, axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: "OptimConfig", model_cfg: "ModelConfig", axes_tree: Any,
                   total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    multipliers = lr_multipliers(axes_tree, model_cfg, cfg.name)
    mask = decay_mask(axes_tree)
    if cfg.independent_weight_decay:
        # The decay follows the schedule's shape but not the peak LR's size.
        decay_rate = lambda step: cfg.weight_decay * lr(step) / cfg.lr  # noqa: E731
    else:
        decay_rate = lambda step: cfg.weight_decay * lr(step)  # noqa: E731

    def init_fn(params):
        return {"count": jnp.zeros([], jnp.int32)}

    def update_fn(updates, state, params):
        step = state["count"]
        rate, decay = lr(step), decay_rate(step)
        updates = jax.tree.map(
            lambda u, p, mult, m: -rate * mult * u - (decay * p if m else 0.0),
            updates, params, multipliers, mask)
        return updates, {"count": step + 1}

    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(DIRECTIONS[cfg.name].transform(getattr(cfg, cfg.name)))
    parts.append(optax.GradientTransformation(init_fn, update_fn))
    return optax.chain(*parts)


# The registrations: one import per direction file.
from lm.optim import adamw  # noqa: E402, F401
