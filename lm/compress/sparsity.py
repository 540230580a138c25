"""Semi-structured N:M sparsity (2:4 by default): the `sparsity` config section, the
masks, their scores, the train step's hook, and the one-shot `prune_2_4`
(`lm prune RUN --out NEW --method 2:4`).

A mask keeps N of every M consecutive weights along a matrix's fan-in (input)
dimension, the layout NVIDIA's 2:4 sparse tensor cores run: for y = x @ W with W
[in, out], each group is M consecutive input rows of one output column. A matrix with
several fan-in axes (attention's wo [heads, head_dim, d_model]) groups along them
flattened (heads-major), as its Hugging Face form [d_model, heads * head_dim] does.

The masks live in the train state beside the params, state["sparsity"]: a tree with
the targets' paths of the params tree, boolean, on the params' shardings; not
trained, no optimizer state; checkpointed with the state and restored on resume. The
forward always computes with params * mask (`masked`), in the train step and wherever
params are read for inference or export (lm/train/param_source.py `_read_params`, the
one place: lm eval, sample, generate, serve, export hf and --init-from all go through
it), so a run's weights outside the mask never act.

mode
  fixed    the masks are kept as they are. The step multiplies the gradient by the mask
           and the updated params again by it: pruned weights stay exactly zero, whatever
           the optimizer (momentum, weight decay) would do.
  learned  Adaptive Sparse Training (Huang et al. 2024, "Pruning LLMs with Semi-Structural
           Adaptive Sparse Training"): the dense weights train through a straight-through
           estimator (the gradient of the masked weights is applied to the dense ones)
           with SR-STE's decay of the pruned weights (Zhou et al. 2021: gradient +=
           decay * (1 - mask) * w), and the mask is recomputed from the weights'
           magnitudes after every `update_every` steps up to step `freeze_at`, frozen
           after.

A run's first masks (a fresh state: its init, or --init-from weights) are the top-N
magnitudes per group of the weights it starts from: for a pruned run's weights (zeros
outside its mask) that is its mask again.

This module imports nothing of lmlab beyond the schema and errors at import: lm.config
imports it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from lm.errors import ConfigError
from lm.schema import knob

MODES = ("off", "fixed", "learned")
SCORES = ("magnitude", "obs")

# The fan-in (input) axes of each projection matrix, by its name and logical axis names:
# what a group of M runs along; the first alternative whose axes the matrix has. (The
# MLP's w_out is stored [d_model, d_ff], MoE's [experts, d_expert, d_model], Mamba-2's
# [d_inner, d_model]: their inputs are the "mlp" / "expert_mlp" axes.)
_EMBED = (("embed",),)
FAN_IN = {
    "wq": _EMBED, "wk": _EMBED, "wv": _EMBED, "wg": _EMBED, "wo": (("heads", "head_dim"),),
    "w_in": _EMBED, "w_gate": _EMBED, "w_out": (("mlp",), ("expert_mlp",)),
    "w_z": _EMBED, "w_x": _EMBED, "w_b": _EMBED, "w_c": _EMBED, "w_dt": _EMBED,
}


@dataclass(frozen=True)
class SparsityConfig:
    """Semi-structured N:M weight sparsity (lm/compress/sparsity.py)."""
    mode: Literal["off", "fixed", "learned"] = knob(
        "off", doc="off; fixed = the masks are kept (pruned weights stay exactly zero; `lm "
                   "prune --method 2:4` writes such a run); learned = Adaptive Sparse "
                   "Training: the masks follow the weights' magnitudes every update_every "
                   "steps until freeze_at, the dense weights training through a "
                   "straight-through estimator with SR-STE decay. A run's first masks are "
                   "the top-N magnitudes per group of its first weights.")
    pattern: str = knob(
        "2:4", doc="N:M: N weights kept in every M consecutive ones along each target "
                   "matrix's fan-in (input) dimension (2:4: NVIDIA's sparse tensor cores).")
    targets: str = knob(
        "blocks.*.mixer.w[qkvo],blocks.*.channel.w_*",
        doc="Comma-separated globs over the params' dotted paths (e.g. blocks.0.mixer.wq) "
            "of the matrices made sparse; each must match a parameter. Default: the "
            "attention and MLP projections of every block (not the embedding, readout or "
            "norms).")
    update_every: int = knob(
        10, doc="mode=learned: the masks are recomputed from the weights' magnitudes after "
                "every this many steps.")
    freeze_at: int = knob(
        0, doc="mode=learned: no mask update after this step (the masks are frozen); 0 = "
               "never frozen.")
    decay: float = knob(
        2e-4, doc="mode=learned: SR-STE's decay of the pruned weights, added to their "
                  "gradient as decay * w (Zhou et al. 2021).")


def enabled(cfg: SparsityConfig) -> bool:
    return cfg.mode != "off"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(N, M) of "N:M", or ConfigError."""
    n, sep, m = pattern.partition(":")
    try:
        n, m = int(n), int(m)
    except ValueError:
        sep = ""
    if not sep:
        raise ConfigError(f"sparsity.pattern={pattern!r} is not N:M (e.g. 2:4)")
    if not 0 < n < m:
        raise ConfigError(f"sparsity.pattern={pattern!r}: need 0 < N < M")
    return n, m


def validate(cfg: SparsityConfig) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"sparsity.mode={cfg.mode!r}: one of {', '.join(MODES)}")
    parse_pattern(cfg.pattern)
    if not [g for g in cfg.targets.split(",") if g.strip()]:
        raise ConfigError("sparsity.targets is empty")
    if cfg.update_every <= 0:
        raise ConfigError(f"sparsity.update_every must be positive, got {cfg.update_every}")
    if cfg.freeze_at < 0:
        raise ConfigError(f"sparsity.freeze_at must be >= 0, got {cfg.freeze_at}")
    if cfg.decay < 0:
        raise ConfigError(f"sparsity.decay must be >= 0, got {cfg.decay}")


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def target_paths(cfg: SparsityConfig, params: dict, axes: dict) -> dict[tuple, tuple[int, ...]]:
    """{path of a target matrix in params: its fan-in axes (indices)}; ConfigError for a
    glob that matches no parameter, a target with no known fan-in, or a fan-in that M
    does not divide. `params` may be abstract (shapes only)."""
    from lm.tree import get_path, leaf_paths
    _, m = parse_pattern(cfg.pattern)
    leaves = dict(leaf_paths(params))
    out = {}
    for glob in filter(None, (g.strip() for g in cfg.targets.split(","))):
        hits = [p for p in leaves if fnmatch.fnmatchcase(dotted(p), glob)]
        if not hits:
            raise ConfigError(f"sparsity.targets: {glob!r} matches no parameter (e.g. "
                              f"{', '.join(dotted(p) for p in list(leaves)[:3])})")
        for path in hits:
            names = get_path(axes, path)
            fan_in = next((f for f in FAN_IN.get(path[-1], ()) if set(f) <= set(names)), None)
            if fan_in is None:
                raise ConfigError(f"sparsity.targets: {dotted(path)} {tuple(names)} is not a "
                                  f"projection matrix with a known fan-in ({', '.join(FAN_IN)})")
            idx = tuple(names.index(a) for a in fan_in)
            k = 1
            for i in idx:
                k *= leaves[path].shape[i]
            if k % m:
                raise ConfigError(f"sparsity.pattern={cfg.pattern}: the fan-in of "
                                  f"{dotted(path)} ({k}) does not divide by M={m}")
            out[path] = idx
    return out


def group_mask(score, fan_in: tuple[int, ...], n: int, m: int):
    """Boolean mask of score's shape keeping the N largest scores of every M consecutive
    entries along the (flattened) fan-in axes; ties go to the first."""
    import jax
    import jax.numpy as jnp
    nd = score.ndim
    rest = tuple(i for i in range(nd) if i not in fan_in)
    perm = rest + tuple(fan_in)
    moved = jnp.transpose(score, perm)
    lead = moved.shape[:len(rest)]
    groups = moved.reshape(*lead, -1, m).astype(jnp.float32)
    _, keep = jax.lax.top_k(groups, n)
    mask = jnp.sum(jax.nn.one_hot(keep, m, dtype=jnp.int32), axis=-2) > 0
    return jnp.transpose(mask.reshape(moved.shape), tuple(perm.index(i) for i in range(nd)))


def masks_from_scores(cfg: SparsityConfig, scores: dict, fan_ins: dict) -> dict:
    """{"path": mask} trees: the N:M masks of `scores` (a tree holding the targets'
    paths) for the targets of `fan_ins` (target_paths)."""
    from lm.tree import get_path, set_path
    n, m = parse_pattern(cfg.pattern)
    out: dict = {}
    for path, fan_in in fan_ins.items():
        set_path(out, path, group_mask(get_path(scores, path), fan_in, n, m))
    return out


def magnitude_masks(cfg: SparsityConfig, params: dict, fan_ins: dict) -> dict:
    import jax.numpy as jnp
    from lm.tree import get_path, set_path
    scores: dict = {}
    for path in fan_ins:
        set_path(scores, path, jnp.abs(get_path(params, path)))
    return masks_from_scores(cfg, scores, fan_ins)


def _map_targets(fn, params: dict, masks: dict, *more: dict) -> dict:
    """params with fn(param, mask, *more's leaves) at the paths `masks` holds."""
    from lm.tree import get_path, leaf_paths, set_path
    out = _copy_dicts(params)
    for path, mask in leaf_paths(masks):
        set_path(out, path, fn(get_path(params, path), mask, *(get_path(t, path) for t in more)))
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def masked(params: dict, masks: dict) -> dict:
    """params with every target multiplied by its mask (the weights the model computes
    with)."""
    return _map_targets(lambda w, m: w * m.astype(w.dtype), params, masks)


def effective_params(state: dict) -> dict:
    """A train state's params as the model computes with them (masked when the state has
    masks)."""
    if "sparsity" not in state:
        return state["params"]
    return masked(state["params"], state["sparsity"])


def gradients(cfg: SparsityConfig, grads: dict, params: dict, masks: dict) -> dict:
    """The gradient the optimizer gets, from the gradient of the masked weights: fixed,
    masked (pruned weights get none); learned, straight through to the dense weights
    plus SR-STE's decay of the pruned ones."""
    if cfg.mode == "fixed":
        return _map_targets(lambda g, m: g * m.astype(g.dtype), grads, masks)
    decay = cfg.decay
    return _map_targets(lambda g, m, w: g + (decay * (~m)).astype(g.dtype) * w.astype(g.dtype),
                        grads, masks, params)


def after_update(cfg: SparsityConfig, new_params: dict, masks: dict, step, fan_ins: dict):
    """(params, masks, number of mask entries changed) after the optimizer's update at
    0-based `step` (traced): fixed, the params masked again; learned, the masks
    recomputed from the new weights when step + 1 is a multiple of update_every and not
    past freeze_at."""
    import jax
    import jax.numpy as jnp
    if cfg.mode == "fixed":
        return masked(new_params, masks), masks, jnp.float32(0)
    done = step + 1
    due = (done % cfg.update_every) == 0
    if cfg.freeze_at:
        due = due & (done <= cfg.freeze_at)
    fresh = magnitude_masks(cfg, new_params, fan_ins)
    new_masks = jax.tree.map(lambda f, old: jnp.where(due, f, old), fresh, masks)
    flips = sum(jnp.sum(a != b) for a, b in zip(jax.tree.leaves(new_masks),
                                               jax.tree.leaves(masks)))
    return new_params, new_masks, flips.astype(jnp.float32)


def mask_stats(masks: dict) -> dict[str, float]:
    """{dotted path: fraction of zeros} of each mask."""
    import numpy as np
    from lm.tree import leaf_paths
    return {dotted(p): float(1 - np.mean(np.asarray(m))) for p, m in leaf_paths(masks)}
