"""From a config to the pieces of a run: model graph, parameter axes, optimizer and the
train state {"params", "opt_state", "step", "rng"} (created under jit, so parameters
are born where they live)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.config import ConfigError, TrainConfig
from lm.model import Transformer, param_axes
from lm.optim import make_optimizer, schedule


def with_vocab(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """Fill model.vocab_size from the tokenizer (0 = unset)."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({vocab_size})")
    return cfg


@dataclass
class RunPieces:
    cfg: TrainConfig
    graphdef: Any
    axes: dict  # logical axis names per parameter
    tx: optax.GradientTransformation
    lr_fn: Callable

    def init_state(self) -> dict:
        def init():
            model = Transformer(self.cfg.model, nnx.Rngs(params=self.cfg.seed))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return {"params": params, "opt_state": self.tx.init(params),
                    "step": jnp.zeros([], jnp.int32),
                    "rng": jax.random.PRNGKey(self.cfg.seed + 1)}
        return jax.jit(init)()

    def abstract_state(self) -> dict:
        return jax.eval_shape(self.init_state)


def build(cfg: TrainConfig) -> RunPieces:
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    axes = param_axes(abstract)
    tx = make_optimizer(cfg.optim, cfg.model, axes, cfg.steps)
    return RunPieces(cfg, graphdef, axes, tx, schedule(cfg.optim, cfg.steps))
