"""Feed-forward block: GELU or SwiGLU."""

from __future__ import annotations

import math

import jax
from flax import nnx

from lm.config import ModelConfig
from lm.model.layers import DTYPES, hidden_std, param
from lm.parallel.sharding import constrain


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.kind = cfg.mlp
        self.compute_dtype = DTYPES[cfg.compute_dtype]
        d, f = cfg.d_model, cfg.d_ff
        self.w_in = param(rngs, (d, f), ("embed", "mlp"), hidden_std(cfg, d), pdt)
        if cfg.mlp == "swiglu":
            self.w_gate = param(rngs, (d, f), ("embed", "mlp"), hidden_std(cfg, d), pdt)
        # Residual-branch output projections are scaled down with depth (GPT-2).
        out_std = hidden_std(cfg, f) / math.sqrt(2 * cfg.n_layers)
        self.w_out = param(rngs, (f, d), ("mlp", "embed"), out_std, pdt)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        h_BTF = x_BTD @ self.w_in[...].astype(cdt)
        if self.kind == "swiglu":
            h_BTF = jax.nn.silu(x_BTD @ self.w_gate[...].astype(cdt)) * h_BTF
        else:
            h_BTF = jax.nn.gelu(h_BTF)
        h_BTF = constrain(h_BTF, ("batch", "seq", "mlp"))  # column-parallel, then row
        return h_BTF @ self.w_out[...].astype(cdt)
