"""Small building blocks shared by the model: parameters with logical axes, norms, RoPE."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
          dtype) -> nnx.Param:
    """A normal(0, std) parameter tagged with logical axis names (see lm/parallel for the
    mapping to mesh axes). std == 0 gives zeros (and draws nothing from `rngs`). A traced
    std (batched trials' init scale: lm/train/trials.py) always draws."""
    assert len(shape) == len(axes), (shape, axes)
    if isinstance(std, (int, float)) and std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def hidden_std(cfg: "ModelConfig", fan_in: int) -> float:
    """Init std for a hidden matrix. Standard: cfg.init_std. muP: variance proportional to
    1/fan_in, equal to init_std**2 at the base width."""
    if cfg.init == "mup":
        return cfg.init_std * math.sqrt(cfg.mup_base_width / fan_in)
    return cfg.init_std


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, kind: str, axis_name: str, dtype, eps: float = 1e-6):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))
        if kind == "layer":
            self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.kind == "layer":
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


@functools.lru_cache(maxsize=16)
def _rope_table(length: int, d: int, theta: float, scaling=None) -> np.ndarray:
    """[length, 2, d/2]: sin and cos of every position's angles (times the scaling's
    attention factor), in float32."""
    from lm.model import rope_scaling
    freq = rope_scaling.inv_freq(d, theta, scaling, length)
    angle = np.arange(length, dtype=np.float64)[:, None] * freq
    table = np.stack([np.sin(angle), np.cos(angle)], axis=1) * rope_scaling.attention_factor(scaling)
    return table.astype(np.float32)


def rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float,
         max_len: int | None = None, scaling=None) -> jax.Array:
    """Rotary position embedding (rotate-half form) at the given integer positions.

    With `max_len` (positions are below it) and a CPU target, sin and cos are gathered
    from a table computed once on the host: computed in the graph, XLA:CPU fuses them into
    every consumer and recomputes them for each head and element, forward and backward.
    On accelerators they are computed (cheap there); a table gather also trips libtpu
    0.0.50's SparseCore lowering on v5p / v6e (RET_CHECK "Could not find buffer").
    `scaling`: a RopeScaling (lm/model/rope_scaling.py), None = plain RoPE; its
    original length defaults to `max_len`."""
    from lm.kernels.dispatch import target_platform
    from lm.model import rope_scaling

    d = x_BTHD.shape[-1]
    if max_len is None or target_platform() != "cpu":
        freq = jnp.asarray(rope_scaling.inv_freq(d, theta, scaling, max_len or 0), jnp.float32)
        angle_BTF = positions_BT.astype(jnp.float32)[..., None] * freq
        mscale = rope_scaling.attention_factor(scaling)
        sin_BTF, cos_BTF = jnp.sin(angle_BTF) * mscale, jnp.cos(angle_BTF) * mscale
    else:
        # Out-of-range positions read NaN (a loud failure) instead of clamping.
        table = jnp.asarray(_rope_table(max_len, d, float(theta), scaling)).at[positions_BT].get(
            mode="fill", fill_value=jnp.nan)
        sin_BTF, cos_BTF = table[:, :, 0], table[:, :, 1]
    sin, cos = sin_BTF[:, :, None, :], cos_BTF[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)
