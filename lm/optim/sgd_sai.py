"""SGD-SaI's update direction (optim.name=sgd_sai, section optim.sgd_sai; Xu et al. 2024,
"No More Adam: Learning Rate Scaling at Initialization is All You Need",
arXiv:2412.11768): SGD with momentum whose LR is scaled per parameter block by the
gradient signal-to-noise ratio measured once, on the first step:

    gsnr_b = ||g_b||_2 / (std(g_b) + eps)      (std unbiased, 0 for a one-element block)
    m_1 = g_1;  m_t = momentum * m_{t-1} + (1 - momentum) * g_t;  direction = gsnr_b * m_t

as in the authors' reference implementation. A block is one parameter tensor, or one
layer's (one expert's) slice of a stacked parameter ("layers" / "experts" axes), which
is what a block is in the unstacked PyTorch models of the paper. State: the momentum (4
bytes per float32 parameter, half of AdamW's 8) plus one scalar per block. optax has no
SGD-SaI; this file is the one written here. The decay (coupled, lr x weight_decay) is the
shared chain's, as in the reference.

muP (see mup_rule): g_b / std(g_b) has entries of size ~1 like Adam's update, and
||g_b|| / std(g_b) ~ sqrt(size of the block), so SGD-SaI's update is an Adam-like one
times sqrt(block size). Its muP multiplier is therefore Adam's (Tensor Programs V,
Table 3) times sqrt(size at the base width / size now), which cancels the growth of the
SNR with width: hidden matrices (size ~ width^2) x (base/width)^2, embeddings and norm
vectors (size ~ width) x sqrt(base/width). Derived here from the definition, not from the
paper (which has no muP rule); the coordinate check is its test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm.errors import ConfigError
from lm.optim.direction import BLOCK_AXES, Direction, register
from lm.schema import knob


@dataclass(frozen=True)
class SGDSaIConfig:
    """SGD with momentum scaled at init by each block's gradient SNR (optim.name=sgd_sai)."""
    momentum: float = knob(0.9, doc="Momentum.")
    eps: float = knob(1e-8, doc="Added to the gradient's std in the SNR.")


class SGDSaIState(NamedTuple):
    count: jax.Array  # steps taken
    gsnr: Any  # per block: shape = the parameter's block axes (() for a plain tensor)
    mu: Any  # the momentum, shaped like the parameters


def block_axes(axes: tuple[str, ...]) -> int:
    """How many leading axes index independent blocks (stacked layers, experts)."""
    n = 0
    while n < len(axes) and axes[n] in BLOCK_AXES:
        n += 1
    return n


def gsnr(g: jax.Array, n_block_axes: int, eps: float) -> jax.Array:
    """||g|| / (std(g) + eps) over each block (the axes after the first n_block_axes)."""
    g = g.astype(jnp.float32)
    reduce = tuple(range(n_block_axes, g.ndim))
    n = math.prod(g.shape[i] for i in reduce)
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=reduce))
    if n < 2:  # the unbiased std of one element is NaN in the reference: taken as 0
        return norm / eps
    std = jnp.std(g, axis=reduce, ddof=1)
    return norm / (std + eps)


def scale_by_sgd_sai(momentum: float, eps: float, axes_tree: Any) -> optax.GradientTransformation:
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    n_blocks = jax.tree.map(block_axes, axes_tree, is_leaf=is_axes)

    def init_fn(params):
        return SGDSaIState(
            count=jnp.zeros([], jnp.int32),
            gsnr=jax.tree.map(lambda p, k: jnp.zeros(p.shape[:k], jnp.float32), params, n_blocks),
            mu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        first = state.count == 0
        new_gsnr = jax.tree.map(
            lambda g, old, k: jnp.where(first, gsnr(g, k, eps), old), updates, state.gsnr, n_blocks)
        mu = jax.tree.map(lambda g, m: jnp.where(first, g, momentum * m + (1 - momentum) * g),
                          updates, state.mu)
        out = jax.tree.map(
            lambda m, s, k: (m * s.reshape(s.shape + (1,) * (m.ndim - k))).astype(m.dtype),
            mu, new_gsnr, n_blocks)
        return out, SGDSaIState(count=optax.safe_increment(state.count), gsnr=new_gsnr, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


@register
class SGDSaI(Direction):
    name, Config = "sgd_sai", SGDSaIConfig
    mup_needs_sizes = True

    @staticmethod
    def transform(section: SGDSaIConfig, axes_tree) -> optax.GradientTransformation:
        return scale_by_sgd_sai(section.momentum, section.eps, axes_tree)

    @staticmethod
    def validate(section: SGDSaIConfig) -> None:
        if not 0 <= section.momentum < 1:
            raise ConfigError(f"optim.sgd_sai.momentum must be in [0, 1), got {section.momentum}")
        if section.eps < 0:
            raise ConfigError(f"optim.sgd_sai.eps must be >= 0, got {section.eps}")

    @staticmethod
    def mup_rule(section: SGDSaIConfig) -> str:
        return ("SGD-SaI: Adam's rule x sqrt(block size at base width / size now), cancelling "
                "the SNR's sqrt(size) growth (derived in lm/optim/sgd_sai.py)")

    @staticmethod
    def mup_lr_scale(width_ratio, axes, section, size_ratio=None) -> float:
        return Direction.mup_lr_scale(width_ratio, axes, section) * math.sqrt(size_ratio)
