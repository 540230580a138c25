"""Sequence mixers built on the linear-recurrence scan (kernels/scan): Mamba-2 (SSD)
and RetNet multi-scale retention.

Both have the Attention module's interface, `(x, positions, segment_ids, cache,
cache_index) -> (y, new_cache, max_logit)`. Training runs the chunked parallel form;
with a cache (decoding) the same scan continues from the cached state, so a decode step
costs O(1) in the length of the text, and prefill-then-decode equals the parallel form.
Documents packed into one row never exchange state: the scan resets at segment changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.scan import linear_scan
from lm.config import ModelConfig
from lm.model.layers import DTYPES, Norm, hidden_std, param, rope

NO_LOGIT = jnp.nan  # the max-attention-logit diagnostic does not apply to these layers


def causal_conv(x_BTC, w_KC, b_C, segment_ids_BT, prefix_BKC):
    """Depthwise causal convolution of width K; taps never reach into the previous
    document. `prefix_BKC` holds the K-1 inputs before x (zeros, or the decoding cache).
    Returns (y_BTC, the last K-1 inputs: the next cache)."""
    k = w_KC.shape[0]
    t = x_BTC.shape[1]
    xp = jnp.concatenate([prefix_BKC.astype(x_BTC.dtype), x_BTC], axis=1)
    # The prefix belongs to the first token's document (it is its own past).
    segp = jnp.concatenate(
        [jnp.repeat(segment_ids_BT[:, :1], k - 1, axis=1), segment_ids_BT], axis=1)
    y = b_C.astype(x_BTC.dtype)
    for lag in range(k):  # tap `lag` steps back; w[k - 1] multiplies the current input
        start = k - 1 - lag
        same = (segp[:, start:start + t] == segment_ids_BT)[..., None]
        y = y + jnp.where(same, xp[:, start:start + t], 0) * w_KC[k - 1 - lag].astype(x_BTC.dtype)
    return y, xp[:, t:]


class Mamba2(nnx.Module):
    """Mamba-2 mixer (Dao & Gu 2024): input projections z, x, B, C, dt; a causal depthwise
    conv on (x, B, C); the SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,
    y_t = C_t h_t + D x_t (one B/C group shared by all heads); gated RMSNorm; output
    projection. Heads = model.n_heads, each of width ssm_expand * d_model / n_heads."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cdt = DTYPES[cfg.compute_dtype]
        d, n, h = cfg.d_model, cfg.ssm_state, cfg.n_heads
        di = cfg.ssm_expand * d
        self.heads, self.head_width, self.state, self.inner = h, di // h, n, di
        self.chunk, self.impl, self.conv_width = cfg.scan_chunk, cfg.scan_impl, cfg.ssm_conv
        std = hidden_std(cfg, d)
        self.w_z = param(rngs, (d, di), ("embed", "mlp"), std, pdt)
        self.w_x = param(rngs, (d, di), ("embed", "mlp"), std, pdt)
        self.w_b = param(rngs, (d, n), ("embed", "head_dim"), std, pdt)
        self.w_c = param(rngs, (d, n), ("embed", "head_dim"), std, pdt)
        self.w_dt = param(rngs, (d, h), ("embed", "heads"), std, pdt)
        conv_std = 1.0 / math.sqrt(cfg.ssm_conv)
        self.conv_x = param(rngs, (cfg.ssm_conv, di), ("conv", "mlp"), conv_std, pdt)
        self.conv_bc = param(rngs, (cfg.ssm_conv, 2 * n), ("conv", "head_dim"),
                             conv_std, pdt)
        self.conv_x_bias = nnx.Param(jnp.zeros((di,), pdt), logical_axes=("mlp",))
        self.conv_bc_bias = nnx.Param(jnp.zeros((2 * n,), pdt), logical_axes=("head_dim",))
        # dt = softplus(. + dt_bias) starts log-uniform in [1e-3, 1e-1]; A = -exp(A_log)
        # uniform in [1, 16] (the Mamba-2 reference initialisation).
        dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), minval=math.log(1e-3),
                                        maxval=math.log(1e-1)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(pdt),
                                 logical_axes=("heads",))
        self.a_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), minval=1.0,
                                                          maxval=16.0)).astype(pdt),
                               logical_axes=("heads",))
        self.skip = nnx.Param(jnp.ones((h,), pdt), logical_axes=("heads",))
        self.out_norm = Norm(di, "rms", "mlp", pdt)
        out_std = hidden_std(cfg, di) / math.sqrt(2 * cfg.n_layers)
        self.w_out = param(rngs, (di, d), ("mlp", "embed"), out_std, pdt)

    def init_cache(self, batch: int, length: int = 0) -> dict:
        return {"ssm": jnp.zeros((batch, self.heads, self.state, self.head_width), jnp.float32),
                "conv_x": jnp.zeros((batch, self.conv_width - 1, self.inner), self.cdt),
                "conv_bc": jnp.zeros((batch, self.conv_width - 1, 2 * self.state), self.cdt)}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del positions_BT, cache_index  # order is implicit in the recurrence
        cdt = self.cdt
        b, t, _ = x_BTD.shape
        h, p, n = self.heads, self.head_width, self.state
        z = x_BTD @ self.w_z[...].astype(cdt)
        xs = x_BTD @ self.w_x[...].astype(cdt)
        bc = jnp.concatenate([x_BTD @ self.w_b[...].astype(cdt),
                              x_BTD @ self.w_c[...].astype(cdt)], axis=-1)
        dt = jax.nn.softplus((x_BTD @ self.w_dt[...].astype(cdt)).astype(jnp.float32)
                             + self.dt_bias[...].astype(jnp.float32))
        decoding = cache is not None
        cache = cache if decoding else self.init_cache(b)  # training: zero history
        xs, conv_x = causal_conv(xs, self.conv_x[...], self.conv_x_bias[...], segment_ids_BT,
                                 cache["conv_x"])
        bc, conv_bc = causal_conv(bc, self.conv_bc[...], self.conv_bc_bias[...],
                                  segment_ids_BT, cache["conv_bc"])
        xs, bc = jax.nn.silu(xs), jax.nn.silu(bc)
        x_BTHP = xs.reshape(b, t, h, p)
        log_decay = dt * -jnp.exp(self.a_log[...].astype(jnp.float32))
        k_BTGN, q_BTGN = bc[..., None, :n], bc[..., None, n:]
        y, ssm = linear_scan(q_BTGN, k_BTGN, (x_BTHP * dt[..., None]).astype(cdt), log_decay,
                             segment_ids=segment_ids_BT, initial_state=cache["ssm"],
                             chunk_size=self.chunk, impl=self.impl)
        y = y + x_BTHP * self.skip[...].astype(cdt)[:, None]
        y = self.out_norm(y.reshape(b, t, h * p) * jax.nn.silu(z))
        out = y @ self.w_out[...].astype(cdt)
        new_cache = {"ssm": ssm, "conv_x": conv_x, "conv_bc": conv_bc} if decoding else None
        return out, new_cache, jnp.float32(NO_LOGIT)


class Retention(nnx.Module):
    """RetNet multi-scale retention (Sun et al. 2023): per head h a fixed decay
    gamma_h = 1 - 2^(-5-h); q and k rotated (RoPE, in place of xPos), k scaled by
    1/sqrt(d_head); S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t; a per-head norm, a
    swish gate, and the output projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cdt = DTYPES[cfg.compute_dtype]
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.dh
        self.heads, self.dh, self.rope_theta = h, dh, cfg.rope_theta
        self.max_len = cfg.max_seq_len
        self.chunk, self.impl = cfg.scan_chunk, cfg.scan_impl
        std = hidden_std(cfg, d)
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wk = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wv = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wg = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.head_norm = Norm(dh, "rms", "head_dim", pdt)
        out_std = hidden_std(cfg, h * dh) / math.sqrt(2 * cfg.n_layers)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), out_std, pdt)

    def init_cache(self, batch: int, length: int = 0) -> dict:
        return {"state": jnp.zeros((batch, self.heads, self.dh, self.dh), jnp.float32)}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del cache_index
        cdt = self.cdt
        b, t, _ = x_BTD.shape
        def proj(w):
            return jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(cdt))
        q = rope(proj(self.wq), positions_BT, self.rope_theta, self.max_len)
        k = rope(proj(self.wk), positions_BT, self.rope_theta, self.max_len) * (self.dh ** -0.5)
        gamma = 1.0 - 2.0 ** (-5.0 - jnp.arange(self.heads, dtype=jnp.float32))
        log_decay = jnp.broadcast_to(jnp.log(gamma), (b, t, self.heads))
        y, state = linear_scan(q, k, proj(self.wv), log_decay, segment_ids=segment_ids_BT,
                               initial_state=None if cache is None else cache["state"],
                               chunk_size=self.chunk, impl=self.impl)
        y = self.head_norm(y) * jax.nn.silu(proj(self.wg))
        out = jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(cdt))
        return out, (None if cache is None else {"state": state}), jnp.float32(NO_LOGIT)
