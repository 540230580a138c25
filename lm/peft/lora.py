"""LoRA (Hu et al. 2021): a frozen base model plus trainable low-rank updates
W = W0 + (alpha / rank) * A @ B on the weights whose names match `lora.targets`.

The model is `LoRAModel`: the base Transformer (frozen: its weights reach the step
through stop_gradient, so no gradient flows into them) and one (A, B) pair per target,
A [fan-in..., rank] random, B [rank, fan-out...] zero (the update starts at 0). Each call
builds the effective weights once (a rank-r matmul per target, independent of the
batch) and runs the base graph with them, so every mixer, kernel and cache of the base
model works unchanged. The weights that may be targets are those the layer's mixers
declare `adaptable` (lm/model/mixers/base.py), with their number of leading fan-in axes
(the ones the matmul contracts): a weight [in..., out...] gets A [in..., rank] and
B [rank, out...].

The optimizer (`adapter_optimizer`) holds state only for the adapters; the base's
updates are zeros. `merged_params` folds the adapters into the base weights (lm export
hf writes merged weights).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.errors import ConfigError
from lm.model.adapt import adaptable_matrices, describe_adaptable, init_pair
from lm.model.adapt import low_rank_factors  # noqa: F401  (re-exported)
from lm.schema import knob
from lm.tree import get_path, leaf_paths, path_key, set_path, with_pure_params


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters on a frozen base (lm/peft/lora.py)."""
    rank: int = knob(0, doc="0 = off (full fine-tuning / training).")
    alpha: float = knob(16.0, doc="The update is scaled by alpha / rank.")
    dropout: float = knob(0.0, doc="Only 0: the effective-weight form has no per-token input.")
    targets: str = knob(
        "*.mixer.wq,*.mixer.wk,*.mixer.wv,*.mixer.wo",
        doc="Comma-separated patterns over dotted parameter paths, e.g. "
            "\"blocks.0.mixer.wq\"; the matrices a mixer declares adaptable may match.")
    dylora: bool = knob(
        False, doc="DyLoRA (Valipour et al. 2023): each training call uses only the first r "
                   "ranks, r drawn uniformly from 1..rank (scale alpha / r), so one adapter "
                   "serves every rank. The draw is a hash of the batch's tokens (no RNG "
                   "reaches the model): reproducible for a given data stream, different "
                   "from step to step.")
    eval_rank: int = knob(
        0, doc="Use the first eval_rank ranks (0 = all; with dylora, 0 while training = "
               "drawn). `lm eval --lora-rank r` sets it.")


def validate(cfg: LoRAConfig, model_cfg) -> None:
    if cfg.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0, got {cfg.rank}")
    if not cfg.rank:
        return
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {cfg.alpha}")
    if not 0 <= cfg.eval_rank <= cfg.rank:
        raise ConfigError(f"lora.eval_rank (lm eval --lora-rank) must be in [0, lora.rank="
                          f"{cfg.rank}], got {cfg.eval_rank}")
    if cfg.dropout:
        raise ConfigError("lora.dropout > 0 is not supported (the adapters are applied to "
                          "the weights, not per token)")
    if model_cfg.scan_layers:
        raise ConfigError("lora.rank > 0 needs model.scan_layers=false")
    if model_cfg.recursion.blocks:  # its relaxations are per-layer LoRA already
        raise ConfigError("lora.rank > 0 with model.recursion.blocks > 0 is not supported "
                          "(train the model's own relaxations: model.recursion.relax_rank)")


def _patterns(cfg: LoRAConfig) -> list[str]:
    return [p.strip() for p in cfg.targets.split(",") if p.strip()]


def adaptable_paths(model_cfg, base_params: dict) -> dict[tuple, int]:
    """{path in the base params: fan-in axes} of every matrix the layers' mixers declare
    adaptable (blocks.<layer>.mixer.<name>, blocks.<layer>.channel.<name>)."""
    out = {}
    for layer, block in base_params.get("blocks", {}).items():
        if not isinstance(layer, int) and not str(layer).isdigit():
            continue  # (a scanned stack: refused by validate)
        for path, fan_in in adaptable_matrices(model_cfg, block, int(layer)).items():
            out[("blocks", layer, *path)] = fan_in
    return out


def target_paths(cfg: LoRAConfig, base_params: dict, model_cfg: Any) -> dict[tuple, int]:
    """{path: fan-in axes} of the base parameters that get adapters (ConfigError if none,
    or if a pattern names a weight no mixer declares adaptable, e.g. stacked experts)."""
    adaptable = adaptable_paths(model_cfg, base_params)
    out = {}
    for path, leaf in leaf_paths(base_params):
        name = ".".join(map(str, path))
        if not any(fnmatch.fnmatchcase(name, p) for p in _patterns(cfg)):
            continue
        if tuple(path) not in adaptable:
            raise ConfigError(f"lora.targets: {name} {list(leaf.shape)} is not a weight LoRA "
                              f"adapts here ({describe_adaptable()})")
        out[tuple(path)] = adaptable[tuple(path)]
    if not out:
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no parameter")
    return out


class LoRAModel(nnx.Module):
    """A Transformer with LoRA adapters; the same call interface."""

    def __init__(self, cfg, lora: LoRAConfig, rngs: nnx.Rngs):
        from lm.model import Transformer
        self.cfg = cfg
        self.base = Transformer(cfg, rngs)
        self.alpha, self.rank = lora.alpha, lora.rank
        self.dylora, self.eval_rank = lora.dylora, lora.eval_rank
        base = nnx.to_pure_dict(nnx.state(self.base, nnx.Param))
        flat_axes = {p: v.get_metadata()["logical_axes"]
                     for p, v in nnx.to_flat_state(nnx.state(self.base, nnx.Param))}
        targets = target_paths(lora, base, cfg)
        self.targets = tuple(targets)
        adapters = {}
        for path in self.targets:
            axes, k = tuple(flat_axes[path]), targets[path]
            a, b = init_pair(rngs.params(), get_path(base, path), k, lora.rank)
            adapters[path_key(path)] = nnx.Dict(
                a=nnx.Param(a, logical_axes=axes[:k] + (None,)),
                b=nnx.Param(b, logical_axes=(None,) + axes[k:]))
        self.adapters = nnx.Dict(adapters)

    def active_rank(self, tokens_BT) -> jax.Array:
        """The ranks in use: eval_rank, all, or (DyLoRA training) drawn from 1..rank by
        a hash of the tokens."""
        if self.eval_rank or not self.dylora:
            return jnp.int32(self.eval_rank or self.rank)
        index = jnp.arange(tokens_BT.size, dtype=jnp.uint32).reshape(tokens_BT.shape)
        h = jnp.sum(tokens_BT.astype(jnp.uint32) * (index * jnp.uint32(2654435761) + 1))
        key = jax.random.fold_in(jax.random.key(0), h)
        return jax.random.randint(key, (), 1, self.rank + 1)

    def delta(self, path, r) -> jax.Array:
        """scale * A[..., :r] @ B[:r] (a mask, so r may be traced), scale = alpha / r."""
        ad = self.adapters[path_key(path)]
        a, b = ad["a"][...], ad["b"][...]
        keep = (jnp.arange(self.rank) < r).astype(a.dtype)
        scale = self.alpha / r.astype(jnp.float32)
        return (scale * jnp.tensordot(a * keep, b, axes=1)).astype(a.dtype)

    def merged(self, tokens_BT):
        """The base Transformer with effective weights W0 + scale * A @ B (W0 frozen)."""
        r = self.active_rank(tokens_BT)

        def effective(pure):
            pure = jax.tree.map(jax.lax.stop_gradient, pure)
            for path in self.targets:
                set_path(pure, path, get_path(pure, path) + self.delta(path, r))
            return pure
        return with_pure_params(self.base, effective)

    def __call__(self, tokens_BT, *args, **kwargs):
        return self.merged(tokens_BT)(tokens_BT, *args, **kwargs)

    def hidden_states(self, tokens_BT, *args, **kwargs):
        return self.merged(tokens_BT).hidden_states(tokens_BT, *args, **kwargs)

    def readout(self, x_BTD, weight_DV=None):
        return self.base.readout(x_BTD, weight_DV)

    def readout_weight(self):
        return self.base.readout_weight()  # embeddings / readout carry no adapters

    def init_cache(self, batch: int, length: int):
        return self.base.init_cache(batch, length)

    def init_slot_cache(self, slots: int, pages: int, page_size: int):
        return self.base.init_slot_cache(slots, pages, page_size)


def merged_params(model_cfg, lora: LoRAConfig, params: dict) -> dict:
    """{"base", "adapters"} params -> the base params with the adapters folded in (the
    first lora.eval_rank ranks; 0 = all)."""
    base = jax.tree.map(lambda x: x, params["base"])
    r = lora.eval_rank or lora.rank
    scale = lora.alpha / r
    for path in target_paths(lora, base, model_cfg):
        ad = params["adapters"][path_key(path)]
        w = get_path(base, path)
        delta = scale * jnp.tensordot(ad["a"][..., :r], ad["b"][:r], axes=1)
        set_path(base, path, w + delta.astype(w.dtype))
    return base


def adapter_optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The run's optimizer (`inner`, built over the adapter subtree) applied to the
    adapters only; the base gets zero updates and has no optimizer state."""

    def init(params):
        return inner.init(params["adapters"])

    def update(grads, state, params=None):
        updates, state = inner.update(grads["adapters"], state,
                                      None if params is None else params["adapters"])
        return {"base": jax.tree.map(jnp.zeros_like, grads["base"]), "adapters": updates}, state

    return optax.GradientTransformation(init, update)


def memory_report(abstract_state: dict) -> str:
    """One line: trainable (adapter) params against the frozen base, and the optimizer
    state bytes per device (which only the adapters have)."""
    from lm.parallel.sharding import per_device_bytes
    p = abstract_state["params"]
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(p["adapters"]))
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(p["base"]))
    return (f"LoRA: {trainable:,} trainable params ({100 * trainable / frozen:.2f}% of the "
            f"{frozen:,} frozen); per device: optimizer state "
            f"{per_device_bytes(abstract_state['opt_state']) / 2**20:.2f} MiB, adapters "
            f"{per_device_bytes(p['adapters']) / 2**20:.2f} MiB, frozen base "
            f"{per_device_bytes(p['base']) / 2**20:.2f} MiB")
