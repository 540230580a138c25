"""RetNet multi-scale retention (code "r", section model.retention), built on the
chunked linear-recurrence scan of kernels/scan.

Training runs the chunked parallel form; decoding continues the scan from the cached
[d_head, d_head] state per head, O(1) per token. The scan resets at document boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lm.errors import ConfigError
from lm.schema import knob
from lm.model.layers import DTYPES, Norm, hidden_std, param, rope
from lm.model.mixers.base import SequenceMixer, register, scan_flops_per_token, sharded_linear_scan

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

NO_LOGIT = jnp.nan  # the max-attention-logit diagnostic does not apply to this layer


@dataclass(frozen=True)
class RetentionConfig:
    """RetNet multi-scale retention (mixer code "r")."""
    chunk: int = knob(64, roles={"free_init", "eval_time"},
                      doc="Chunk length of the linear-recurrence scan.")
    scan_impl: Literal["auto", "pallas", "xla"] = knob(
        "auto", roles={"free_init", "eval_time"},
        doc="The scan's kernel: auto = pallas on GPU, xla elsewhere.")

    legacy: ClassVar[dict[str, str]] = {"scan_chunk": "chunk", "scan_impl": "scan_impl"}


@register
class Retention(SequenceMixer):
    """RetNet multi-scale retention (Sun et al. 2023): per head h a fixed decay
    gamma_h = 1 - 2^(-5-h); q and k rotated (RoPE, in place of xPos), k scaled by
    1/sqrt(d_head); S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t; a per-head norm, a
    swish gate, and the output projection."""

    name, code, Config = "retention", "r", RetentionConfig
    output = "wo"
    adaptable = {"wq": 1, "wk": 1, "wv": 1, "wg": 1, "wo": 2}

    @classmethod
    def validate(cls, cfg: "ModelConfig") -> None:
        if cfg.retention.chunk <= 0:
            raise ConfigError(f"model.retention.chunk must be positive, got {cfg.retention.chunk}")

    @classmethod
    def extra_flops_per_token(cls, cfg: "ModelConfig", seq_len: int) -> float:
        return scan_flops_per_token(cfg, seq_len, cfg.retention.chunk, cfg.n_heads, cfg.dh, cfg.dh)

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cdt = DTYPES[cfg.compute_dtype]
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.dh
        self.heads, self.dh, self.rope_theta = h, dh, cfg.rope_theta
        self.max_len = cfg.max_seq_len
        self.rope_scaling = cfg.rope_scaling
        self.chunk, self.impl = cfg.retention.chunk, cfg.retention.scan_impl
        std = hidden_std(cfg, d)
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wk = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wv = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wg = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.head_norm = Norm(dh, "rms", "head_dim", pdt)
        out_std = hidden_std(cfg, h * dh) / math.sqrt(2 * cfg.n_layers)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), out_std, pdt)

    def init_slot_cache(self, slots: int, pages: int, page_size: int) -> dict:
        return self.init_cache(slots)  # one recurrent state per slot; no pages

    def init_cache(self, batch: int, length: int = 0) -> dict:
        return {"state": jnp.zeros((batch, self.heads, self.dh, self.dh), jnp.float32)}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del cache_index
        cdt = self.cdt
        b, t, _ = x_BTD.shape
        def proj(w):
            return jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(cdt))
        q = rope(proj(self.wq), positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling)
        k = rope(proj(self.wk), positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling) * (self.dh ** -0.5)
        gamma = 1.0 - 2.0 ** (-5.0 - jnp.arange(self.heads, dtype=jnp.float32))
        log_decay = jnp.broadcast_to(jnp.log(gamma), (b, t, self.heads))
        y, state = sharded_linear_scan(q, k, proj(self.wv), log_decay,
                                       segment_ids=segment_ids_BT,
                                       initial_state=None if cache is None else cache["state"],
                                       chunk_size=self.chunk, impl=self.impl)
        y = self.head_norm(y) * jax.nn.silu(proj(self.wg))
        out = jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(cdt))
        return out, (None if cache is None else {"state": state}), jnp.float32(NO_LOGIT)
