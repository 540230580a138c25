"""Low-rank adapters of a model's matrices, shared by LoRA (lm/peft/lora.py) and the
relaxations of recursive models (lm/model/recursive.py): which matrices may be adapted
(each mixer declares its own: `adaptable`, lm/model/mixers/base.py), an adapter pair's
init, and the best low-rank factors of a matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lm.model.mixers import adaptable_matrices, describe_adaptable  # noqa: F401  (re-exported)


def low_rank_factors(m, rank: int) -> tuple[jax.Array, jax.Array]:
    """A 2-D matrix's best rank-`rank` factors (truncated SVD, split evenly): L = U sqrt(S)
    [rows, rank], R = sqrt(S) V^T [rank, cols], L @ R ~ m (exact when m's rank is at most
    `rank`); zero-padded past the matrix's own size. In float32."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(m, jnp.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    root = jnp.sqrt(s[:r])
    left = jnp.zeros((m.shape[0], rank), jnp.float32).at[:, :r].set(u[:, :r] * root)
    right = jnp.zeros((rank, m.shape[1]), jnp.float32).at[:r].set(root[:, None] * vt[:r])
    return left, right


def init_pair(key, w, fan_in_axes: int, rank: int) -> tuple[jax.Array, jax.Array]:
    """The adapter of weight `w` at its init: A [fan-in..., rank] ~ N(0, 1 / fan_in),
    B [rank, fan-out...] = 0, so the update A @ B starts at 0."""
    shape_in = w.shape[:fan_in_axes]
    a = jax.random.normal(key, shape_in + (rank,), jnp.float32) / math.sqrt(math.prod(shape_in))
    return a.astype(w.dtype), jnp.zeros((rank,) + w.shape[fan_in_axes:], w.dtype)
