"""Muon's update direction (optim.name=muon, section optim.muon; Jordan et al. 2024,
modded-nanogpt): momentum orthogonalised by a Newton-Schulz iteration
(optax.contrib.scale_by_muon) for the hidden matrices, Adam (optax.scale_by_adam) for
everything else (embeddings, the tied or untied head, norms, biases, depthwise convs),
split with optax.partition by the parameters' logical axes.

A hidden matrix is orthogonalised as [embed, everything else] (the "embed" axis against
the product of the others; "layers" and "experts" are independent blocks, vmapped):
Newton-Schulz is transpose-equivariant, so which side is the fan-in does not matter, and
the update is scaled by consistent_rms * sqrt(max(fan_in, fan_out)) (Liu et al. 2025,
"Muon is Scalable for LLM Training") so that its RMS matches AdamW's and one optim.lr
(and weight decay) serves both parts.

Sharding: the iteration is plain jnp matmuls on the (possibly FSDP- or tensor-sharded)
matrix under jit, so GSPMD computes it on the whole matrix (gathering what it needs): the
result equals the unsharded one (tests/e2e/test_optimizers_processes.py, fsdp=2 x tensor=2). No
per-shard approximation is made; the cost is the all-gathers of the momentum.

muP (see mup_rule): an orthogonalised update of an m x n matrix scaled to entry RMS r has
spectral norm r * sqrt(max(m, n)); the spectral condition for feature learning (Yang,
Simon & Bernstein 2023, arXiv:2310.17813) asks for a width-independent spectral norm on
hidden matrices, so their LR scales as sqrt(base_width / width), not Adam's
base_width / width. The Adam part follows Adam's rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from lm.errors import ConfigError
from lm.optim.direction import BLOCK_AXES, Direction, is_hidden_matrix, register
from lm.schema import knob


@dataclass(frozen=True)
class MuonConfig:
    """Muon: orthogonalised momentum for hidden matrices, Adam for the rest (optim.name=muon)."""
    beta: float = knob(0.95, doc="Momentum.")
    nesterov: bool = knob(True, doc="Nesterov momentum.")
    ns_steps: int = knob(5, doc="Newton-Schulz iterations of the orthogonalisation.")
    consistent_rms: float = knob(0.2, doc="Update RMS of the orthogonalised matrices "
                                          "(AdamW-like).")
    eps: float = knob(1e-8, doc="Added in the orthogonalisation's normalisation and Adam's.")
    adam_b1: float = knob(0.9, doc="The Adam part (embeddings, head, norms): first moment.")
    adam_b2: float = knob(0.95, doc="The Adam part: second moment.")


def muon_dims(axes: tuple[str, ...]) -> MuonDimensionNumbers | None:
    """How a parameter is orthogonalised: its "embed" axis against the other non-block
    axes; None = not by Muon (not a hidden matrix, or no embed axis to split on)."""
    if not is_hidden_matrix(axes) or "embed" not in axes:
        return None
    embed = axes.index("embed")
    others = tuple(i for i, a in enumerate(axes) if a not in BLOCK_AXES and i != embed)
    return MuonDimensionNumbers(reduction_axis=(embed,), output_axis=others)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and not isinstance(x, MuonDimensionNumbers)


def orthogonalize(x: jax.Array, dims: MuonDimensionNumbers, ns_steps: int = 5) -> jax.Array:
    """Newton-Schulz orthogonalisation of one parameter-shaped array, as Muon applies it."""
    from optax.contrib._muon import _DEFAULT_NS_COEFFS, orthogonalize_via_newton_schulz
    return orthogonalize_via_newton_schulz(x, jnp.asarray(_DEFAULT_NS_COEFFS), ns_steps,
                                           dimension_numbers=dims)


def _shape_scale(dims: MuonDimensionNumbers, shape: tuple[int, ...], rms: float) -> float:
    fan_in = math.prod(shape[i] for i in dims.reduction_axis)
    fan_out = math.prod(shape[i] for i in dims.output_axis)
    return rms * math.sqrt(max(fan_in, fan_out))


@register
class Muon(Direction):
    name, Config = "muon", MuonConfig

    @staticmethod
    def transform(section: MuonConfig, axes_tree) -> optax.GradientTransformation:
        dims = jax.tree.map(muon_dims, axes_tree, is_leaf=_is_axes)
        labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims,
                              is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))

        def masked_dims(_):
            # The Muon part sees the params with the Adam ones masked out (optax.partition).
            return jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims,
                                is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))

        def scale_by_shape():
            def update(updates, state, params=None):
                scaled = jax.tree.map(
                    lambda u, d: u * _shape_scale(d, u.shape, section.consistent_rms),
                    updates, masked_dims(None),
                    is_leaf=lambda x: isinstance(x, MuonDimensionNumbers))
                return scaled, state
            return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

        muon = optax.chain(
            scale_by_muon(ns_steps=section.ns_steps, beta=section.beta, eps=section.eps,
                          nesterov=section.nesterov, weight_dimension_numbers=masked_dims),
            scale_by_shape())
        adam = optax.scale_by_adam(b1=section.adam_b1, b2=section.adam_b2, eps=section.eps)
        return optax.partition({"muon": muon, "adam": adam}, labels)

    @staticmethod
    def validate(section: MuonConfig) -> None:
        for key in ("beta", "adam_b1", "adam_b2"):
            if not 0 <= getattr(section, key) < 1:
                raise ConfigError(f"optim.muon.{key} must be in [0, 1), got {getattr(section, key)}")
        if section.ns_steps < 1:
            raise ConfigError(f"optim.muon.ns_steps must be >= 1, got {section.ns_steps}")
        if section.consistent_rms <= 0:
            raise ConfigError(f"optim.muon.consistent_rms must be positive, got {section.consistent_rms}")

    @staticmethod
    def mup_rule(section: MuonConfig) -> str:
        return ("Muon: orthogonalised hidden matrices LR x sqrt(base_width/width) (spectral "
                "condition, Yang, Simon & Bernstein 2023), the Adam part x base_width/width "
                "on its hidden matrices")

    @staticmethod
    def mup_lr_scale(width_ratio, axes, section, size_ratio=None) -> float:
        if muon_dims(axes) is not None:
            return math.sqrt(width_ratio)
        return Direction.mup_lr_scale(width_ratio, axes, section)  # the Adam part
