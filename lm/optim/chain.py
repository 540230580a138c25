"""The shared optimizer chain (lm/optim/__init__.py tells the whole story): validation,
the LR schedule, muP multipliers, weight decay, state shardings; the update direction is
the registered one optim.name names (lm/optim/direction.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lm.errors import ConfigError
from lm.model.config import ModelConfig
from lm.optim.config import OptimConfig
from lm.optim.direction import BLOCK_AXES, DIRECTIONS, is_hidden_matrix  # noqa: F401


def validate(cfg: "OptimConfig") -> None:
    if cfg.name not in DIRECTIONS:
        raise ConfigError(f"optim.name={cfg.name!r}: expected one of {', '.join(DIRECTIONS)}")
    DIRECTIONS[cfg.name].validate(getattr(cfg, cfg.name))


def validate_mup(cfg: "OptimConfig", model_cfg: "ModelConfig") -> None:
    """model.init=mup needs a direction with a muP rule (for its settings)."""
    if model_cfg.init == "mup" and mup_rule(cfg) is None:
        raise ConfigError(f"model.init=mup: optim.name={cfg.name} has no muP rule with these "
                          f"settings (see lm/optim/{cfg.name}.py); use model.init=standard")


def mup_rule(cfg: "OptimConfig") -> str | None:
    return DIRECTIONS[cfg.name].mup_rule(getattr(cfg, cfg.name))


def describe(cfg: "OptimConfig", model_cfg: "ModelConfig", abstract_state: dict) -> tuple[str, float]:
    """(the start-up log line of the optimizer, its state bytes per parameter)."""
    per_param = state_bytes_per_param(abstract_state["opt_state"], abstract_state["params"])
    line = f"optimizer {cfg.name}: {per_param:.2f} state bytes per parameter"
    if model_cfg.init == "mup":
        line += f"; muP rule: {mup_rule(cfg)}"
    return line, per_param


def state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                    other: Any) -> Any:
    """A sharding per optimizer-state leaf: the parameter's where the leaf is a copy of
    one (its key path contains the parameter's and its shape is the same: Adam's moments,
    Muon's momentum, ...), `other` (replicated) for the rest (step counts, Adafactor's
    row / column statistics, SGD-SaI's per-block scales). optax.tree_map_params cannot
    be used: it needs param-shaped subtrees, which optax.partition's masked states and
    per-leaf states of other shapes are not."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    shardings = jax.tree.leaves(param_shardings)
    by_path = {tuple(path): (leaf.shape, sh) for (path, leaf), sh in zip(flat, shardings)}

    def pick(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            for j in range(len(path), i, -1):
                hit = by_path.get(path[i:j])
                if hit is not None and hit[0] == leaf.shape:
                    return hit[1]
        return other
    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_bytes_per_param(opt_state: Any, params: Any) -> float:
    """Optimizer-state bytes per parameter (arrays or ShapeDtypeStructs): AdamW 8 in
    float32, Lion and SGD-SaI 4, Adafactor about 4 / min(rows, cols) for its matrices."""
    def nbytes(x):
        return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return sum(nbytes(x) for x in jax.tree.leaves(opt_state)) / max(n, 1)


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


def _size_ratios(cfg: "ModelConfig") -> Any:
    """Each parameter's element count at d_model = mup_base_width over its count now."""
    import dataclasses as dc

    from flax import nnx

    from lm.model import Transformer

    def sizes(c):
        abstract = nnx.eval_shape(lambda: Transformer(c, nnx.Rngs(0)))
        return jax.tree.map(lambda x: math.prod(x.shape), nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    base = sizes(dc.replace(cfg, d_model=cfg.mup_base_width))
    return jax.tree.map(lambda b, n: b / n, base, sizes(cfg))


def lr_multipliers(axes_tree: Any, cfg: "ModelConfig", direction: str = "adamw",
                   section: Any = None) -> Any:
    """Per-parameter LR multipliers: under muP the direction's rule (Adam-like:
    base_width/width on hidden matrices); standard parametrisation uses 1 everywhere."""
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    if cfg.init != "mup":
        return jax.tree.map(lambda axes: 1.0, axes_tree, is_leaf=is_axes)
    d = DIRECTIONS[direction]
    ratio = cfg.mup_base_width / cfg.d_model
    if d.mup_needs_sizes:
        return jax.tree.map(lambda axes, r: d.mup_lr_scale(ratio, axes, section, r),
                            axes_tree, _size_ratios(cfg), is_leaf=is_axes)
    return jax.tree.map(lambda axes: d.mup_lr_scale(ratio, axes, section), axes_tree,
                        is_leaf=is_axes)


def decay_mask(axes_tree: Any) -> Any:
    """Weight decay applies to matrices, not to norm scales and biases."""
    return jax.tree.map(lambda axes: len(_per_layer(axes)) >= 2, axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: "OptimConfig", model_cfg: "ModelConfig", axes_tree: Any,
                   total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    section = getattr(cfg, cfg.name)
    multipliers = lr_multipliers(axes_tree, model_cfg, cfg.name, section)
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
    parts.append(DIRECTIONS[cfg.name].transform(section, axes_tree))
    parts.append(optax.GradientTransformation(init_fn, update_fn))
    return optax.chain(*parts)

