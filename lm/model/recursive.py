"""Recursive transformers with layer-wise relaxation (Bae et al. 2024, "Relaxed Recursive
Transformers: Effective Parameter Sharing with Layer-wise LoRA"): model.n_layers layers
computed by model.recursion.blocks = K unique blocks.

  order=cycle     layer i runs block i % K: the K blocks looped n_layers / K times (the
                  paper's CYCLE sharing).
  order=sequence  layer i runs block i // (n_layers / K): runs of consecutive layers
                  tied (the paper's SEQUENCE sharing).

relax_rank = r > 0 gives every layer its own rank-r LoRA on its block's matrices (those
its mixers declare `adaptable`: attention's, Mamba-2's, retention's and the MLP's
projections): layer i computes with W_shared + A_i @ B_i. Its norm
scales and biases get a per-layer delta in full (a vector each). r = 0 is strict
sharing; a full rank is as expressive as the untied model.

From a trained untied model (`convert`, reached by `lm train --init-from PARENT --set
model.recursion.blocks=K`): each shared block is the average of the layers tied to it
(the paper's "Average" initialisation) and each relaxation the rank-r truncated SVD of
its layer's residual W_i - W_shared (the paper's SVD initialisation), so with a full
rank the recursive model starts as exactly the parent. `untie` is the inverse map, to
each layer's effective weights: `lm export hf` writes it as a plain model.

Counting: count_params counts what is stored (K blocks and the relaxations); FLOPs per
token are the untied model's, since every layer still runs a whole block. The
relaxations' A @ B is formed once per step, whatever the number of tokens (the same
merged-weight form as lm/peft/lora.py, so every mixer and kernel runs unchanged).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lm.errors import ConfigError
from lm.model import mixers
from lm.model.adapt import adaptable_matrices, init_pair, low_rank_factors
from lm.schema import knob
from lm.tree import get_path, leaf_paths, path_key, set_path, with_pure_params

if TYPE_CHECKING:
    from lm.model.config import ModelConfig


@dataclass(frozen=True)
class Recursion:
    """Layers sharing blocks, with per-layer LoRA relaxations (lm/model/recursive.py)."""
    blocks: int = knob(0, doc="Unique blocks; 0 = off (every layer its own).")
    order: Literal["cycle", "sequence"] = knob(
        "cycle", doc="cycle: layer i runs block i % blocks; sequence: runs of consecutive "
                     "layers share a block.")
    relax_rank: int = knob(0, doc="Per-layer LoRA rank on the shared matrices; 0 = strict "
                                  "sharing.")
    relax: Literal["adaptable", "attention_mlp"] = knob(
        "adaptable", doc="The matrices a relaxation adapts: adaptable = every matrix the "
                         "block's mixers declare; attention_mlp = only those named wq, wk, wv, "
                         "wo, w_in, w_gate, w_out (what runs written before mixers declared "
                         "theirs relaxed: their config.json reads back as this).")


def migrate_model_section(model: dict) -> dict:
    """A `model` section of a config.json written before `recursion.relax` existed: its
    relaxations adapted the attention / MLP names only, which on Mamba-2 and retention
    blocks is fewer matrices than they now declare; such a run reads back as
    relax=attention_mlp, so its checkpoints restore. (On attention / MLP blocks the two
    are the same matrices: those runs keep the default.)"""
    rec = model.get("recursion")
    if (not isinstance(rec, dict) or "relax" in rec or not rec.get("relax_rank")
            or not set(str(model.get("mixer_pattern", "a"))) - {"a"}):
        return model
    return {**model, "recursion": {**rec, "relax": "attention_mlp"}}


# The matrices relax=attention_mlp adapts: name -> (ndim, fan-in axes).
_ATTENTION_MLP = {"wq": (3, 1), "wk": (3, 1), "wv": (3, 1), "wo": (3, 2),
                  "w_in": (2, 1), "w_gate": (2, 1), "w_out": (2, 1)}


def enabled(cfg: "ModelConfig") -> bool:
    return cfg.recursion.blocks > 0


def n_blocks(cfg: "ModelConfig") -> int:
    return cfg.recursion.blocks or cfg.n_layers


def block_of(cfg: "ModelConfig", layer: int) -> int:
    """The index of the block layer `layer` runs."""
    k = cfg.recursion.blocks
    if not k:
        return layer
    return layer % k if cfg.recursion.order == "cycle" else layer // (cfg.n_layers // k)


def first_layer(cfg: "ModelConfig", block: int) -> int:
    """The first layer that runs `block` (its mixer types are every such layer's)."""
    return next(i for i in range(cfg.n_layers) if block_of(cfg, i) == block)


def untied(cfg: "ModelConfig") -> "ModelConfig":
    """The same model with every layer its own block (the parent of a recursive one)."""
    return dataclasses.replace(cfg, recursion=Recursion())


def describe(cfg: "ModelConfig") -> str:
    """One line: the sharing, and the parameters stored against the untied parent's
    (whose FLOPs per token the recursive model has)."""
    from lm.model import count_params
    r = cfg.recursion
    mine, parent = count_params(cfg)["non_embedding"], count_params(untied(cfg))["non_embedding"]
    relax = f", per-layer relaxations of rank {r.relax_rank}" if r.relax_rank else ""
    return (f"recursion: {cfg.n_layers} layers on {r.blocks} shared block(s) ({r.order}"
            f"{relax}): {mine:,} non-embedding params stored, {100 * mine / parent:.0f}% of "
            f"the untied model's {parent:,}; FLOPs per token are the untied model's")


def validate(cfg: "ModelConfig") -> None:
    r = cfg.recursion
    if r.blocks < 0 or r.relax_rank < 0:
        raise ConfigError("model.recursion.blocks and model.recursion.relax_rank must be >= 0")
    if r.order not in ("cycle", "sequence"):
        raise ConfigError(f"model.recursion.order must be cycle or sequence, got {r.order!r}")
    if not r.blocks:
        if r.relax_rank:
            raise ConfigError("model.recursion.relax_rank needs model.recursion.blocks > 0")
        return
    if r.blocks > cfg.n_layers or cfg.n_layers % r.blocks:
        raise ConfigError(f"model.recursion.blocks={r.blocks} must divide model.n_layers="
                          f"{cfg.n_layers}")
    if cfg.scan_layers:
        raise ConfigError("model.recursion.blocks > 0 needs model.scan_layers=false")
    if "e" in cfg.channel_pattern:  # experts are stacked and routed per layer
        raise ConfigError("model.recursion with MoE layers (model.channel_pattern with 'e') "
                          "is not supported")
    for i in range(cfg.n_layers):
        j = first_layer(cfg, block_of(cfg, i))
        if (mixers.sequence_mixer(cfg, i) is not mixers.sequence_mixer(cfg, j)
                or mixers.channel_mixer(cfg, i) is not mixers.channel_mixer(cfg, j)):
            raise ConfigError(f"model.recursion: layer {i} would share block "
                              f"{block_of(cfg, i)} with layer {j}, but their mixers differ "
                              f"(mixer_pattern={cfg.mixer_pattern!r}, channel_pattern="
                              f"{cfg.channel_pattern!r})")
        if mixers.layer_configs(cfg, i) != mixers.layer_configs(cfg, j):
            raise ConfigError(f"model.recursion: layer {i} would share block "
                              f"{block_of(cfg, i)} with layer {j}, but they are configured "
                              "differently (model.attention.window_pattern)")


def _relaxable(cfg: "ModelConfig", block_params: dict, block: int) -> list[tuple[tuple, int]]:
    """(path in the block, fan-in axes) of what a relaxation of block `block` adapts: the
    matrices its mixers declare adaptable low-rank (fan-in axes > 0), and every vector
    (norm scales, biases) in full (0: a per-layer delta, as cheap as the vector itself,
    so that a full-rank relaxation is exactly the untied model). Other matrices (a
    depthwise convolution) stay strictly shared."""
    if cfg.recursion.relax == "attention_mlp":
        matrices = {tuple(path): _ATTENTION_MLP[path[-1]][1]
                    for path, leaf in leaf_paths(block_params)
                    if _ATTENTION_MLP.get(path[-1], (0,))[0] == leaf.ndim}
    else:
        matrices = adaptable_matrices(cfg, block_params, first_layer(cfg, block))
    return [(path, matrices.get(tuple(path), 0)) for path, leaf in leaf_paths(block_params)
            if tuple(path) in matrices or leaf.ndim == 1]


def _relax(cfg: "ModelConfig", block: dict, index: int, adapters) -> dict:
    """Block `index`'s params (a pure dict, updated in place) plus one layer's
    relaxation: A @ B on each matrix, a vector's own delta. `adapters`: arrays or nnx
    Params."""
    for path, _ in _relaxable(cfg, block, index):
        ad = adapters[path_key(path)]
        w = get_path(block, path)
        update = (ad["delta"][...] if "delta" in ad
                  else jnp.tensordot(ad["a"][...], ad["b"][...], axes=1))
        set_path(block, path, w + update.astype(w.dtype))
    return block


class Relaxations(nnx.Module):
    """Per layer, (A, B) for each relaxable matrix of its block, a delta per vector."""

    def __init__(self, cfg: "ModelConfig", blocks, rngs: nnx.Rngs):
        per_block = []  # (params, logical axes, relaxable paths) of each block
        for k, blk in enumerate(blocks):  # (blocks may differ: mixer_pattern "am" over 2)
            state = nnx.state(blk, nnx.Param)
            pure = nnx.to_pure_dict(state)
            per_block.append((pure, {p: tuple(v.get_metadata()["logical_axes"])
                                     for p, v in nnx.to_flat_state(state)},
                              _relaxable(cfg, pure, k)))
        layers = []
        for i in range(cfg.n_layers):
            block, axes, paths = per_block[block_of(cfg, i)]
            adapters = {}
            for path, k in paths:
                w = get_path(block, path)
                if not k:
                    adapters[path_key(path)] = nnx.Dict(delta=nnx.Param(
                        jnp.zeros_like(w), logical_axes=axes[path]))
                    continue
                a, b = init_pair(rngs.params(), w, k, cfg.recursion.relax_rank)
                adapters[path_key(path)] = nnx.Dict(
                    a=nnx.Param(a, logical_axes=axes[path][:k] + (None,)),
                    b=nnx.Param(b, logical_axes=(None,) + axes[path][k:]))
            layers.append(nnx.Dict(adapters))
        self.layers = nnx.List(layers)


def layer_block(model, layer: int):
    """The block module layer `layer` runs: its shared block, with that layer's
    relaxation folded into the weights when there is one."""
    cfg = model.cfg
    k = block_of(cfg, layer)
    block = model.blocks[k]
    if not cfg.recursion.relax_rank:
        return block
    return with_pure_params(block, lambda pure: _relax(cfg, pure, k, model.relax.layers[layer]))


def untie(params: dict, cfg: "ModelConfig") -> dict:
    """A recursive model's params -> its untied equivalent's (each layer's effective
    weights: its block plus its relaxation)."""
    if not enabled(cfg):
        return params
    out = {k: v for k, v in params.items() if k not in ("blocks", "relax")}
    out["blocks"] = {}
    for i in range(cfg.n_layers):
        layer = jax.tree.map(lambda x: x, params["blocks"][block_of(cfg, i)])  # a copy
        if cfg.recursion.relax_rank:
            layer = _relax(cfg, layer, block_of(cfg, i), params["relax"]["layers"][i])
        out["blocks"][i] = layer
    return out


def _svd_init(residual, fan_in_axes: int, rank: int) -> tuple[jax.Array, jax.Array]:
    """The rank-`rank` truncated SVD of `residual` as (A [fan-in..., rank],
    B [rank, fan-out...])."""
    shape_in, shape_out = residual.shape[:fan_in_axes], residual.shape[fan_in_axes:]
    a, b = low_rank_factors(residual.reshape(math.prod(shape_in), math.prod(shape_out)), rank)
    return (a.reshape(shape_in + (rank,)).astype(residual.dtype),
            b.reshape((rank,) + shape_out).astype(residual.dtype))


def tie(parent: dict, cfg: "ModelConfig", seed: int = 0) -> dict:
    """An untied model's params -> the recursive model `cfg`'s: each block the average of
    the layers tied to it, each relaxation the truncated SVD of its layer's residual (a
    layer alone in its group has no residual: its relaxation gets the LoRA init, since
    an all-zero A and B would never get a gradient)."""
    out = {k: v for k, v in parent.items() if k != "blocks"}
    groups = [[i for i in range(cfg.n_layers) if block_of(cfg, i) == k]
              for k in range(n_blocks(cfg))]
    out["blocks"] = {k: jax.tree.map(lambda *ws: sum(ws) / len(ws),
                                     *(parent["blocks"][i] for i in group))
                     for k, group in enumerate(groups)}
    rank = cfg.recursion.relax_rank
    if rank:
        key = jax.random.key(seed)
        layers = {}
        for i in range(cfg.n_layers):
            k = block_of(cfg, i)
            adapters = {}
            for path, fan_in in _relaxable(cfg, out["blocks"][k], k):
                shared = get_path(out["blocks"][k], path)
                own = get_path(parent["blocks"][i], path)
                if not fan_in:
                    adapters[path_key(path)] = {"delta": own - shared}
                    continue
                if len(groups[k]) == 1:
                    key, sub = jax.random.split(key)
                    a, b = init_pair(sub, shared, fan_in, rank)
                else:
                    a, b = _svd_init(own - shared, fan_in, rank)
                adapters[path_key(path)] = {"a": a, "b": b}
            layers[i] = adapters
        out["relax"] = {"layers": layers}
    return out


def convert(params: dict, source: "ModelConfig", target: "ModelConfig", seed: int = 0) -> dict:
    """Params of model `source` -> model `target`, two models that differ at most in
    their recursion: untie the source, tie into the target."""
    if source.recursion == target.recursion:
        return params
    return tie(untie(params, source), target, seed) if enabled(target) else untie(params, source)
