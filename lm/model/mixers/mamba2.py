"""Mamba-2 (SSD) sequence mixer (code "m", section model.mamba2), built on the chunked
linear-recurrence scan of kernels/scan.

Training runs the chunked parallel form; with a cache (decoding) the same scan continues
from the cached state (plus the convolution's tail), so a decode step costs O(1) in the
length of the text, and prefill-then-decode equals the parallel form. Documents packed
into one row never exchange state: the scan and the convolution reset at segment changes.
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
from lm.model.layers import DTYPES, Norm, hidden_std, param
from lm.model.mixers.base import SequenceMixer, register, scan_flops_per_token, sharded_linear_scan

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

NO_LOGIT = jnp.nan  # the max-attention-logit diagnostic does not apply to this layer


def causal_conv(x_BTC, w_KC, b_C, segment_ids_BT, prefix_BKC):
    """Depthwise causal convolution of width K; taps never reach into the previous
    document. `prefix_BKC` holds the K-1 inputs before x (zeros, or the decoding cache).
    Returns (y_BTC, the last K-1 inputs: the next cache, holding only the last token's
    document: inputs of an earlier one, e.g. left padding, are zeros there)."""
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
    last_doc = (segp[:, t:] == segment_ids_BT[:, -1:])[..., None]
    return y, jnp.where(last_doc, xp[:, t:], 0)


def _proj(x_BTD, w_DE):
    """x @ w as an einsum: quantized training (qwix) rewrites jnp.einsum where it is
    called, while `@` reaches lax.dot_general inside jnp.matmul's jit, whose cached trace
    would outlive the quantization (or miss it)."""
    return jnp.einsum("btd,de->bte", x_BTD, w_DE)


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 (SSD) sequence mixer (mixer code "m")."""
    state: int = knob(64, doc="State size N per head.")
    expand: int = knob(2, doc="Inner width = expand * d_model.")
    conv: int = knob(4, doc="Causal depthwise convolution width.")
    chunk: int = knob(64, roles={"free_init", "eval_time"},
                      doc="Chunk length of the linear-recurrence scan.")
    scan_impl: Literal["auto", "pallas", "xla"] = knob(
        "auto", roles={"free_init", "eval_time"},
        doc="The scan's kernel: auto = pallas on GPU, xla elsewhere.")

    legacy: ClassVar[dict[str, str]] = {
        "ssm_state": "state", "ssm_expand": "expand", "ssm_conv": "conv",
        "scan_chunk": "chunk", "scan_impl": "scan_impl"}


@register
class Mamba2(SequenceMixer):
    """Mamba-2 mixer (Dao & Gu 2024): input projections z, x, B, C, dt; a causal depthwise
    conv on (x, B, C); the SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,
    y_t = C_t h_t + D x_t (one B/C group shared by all heads); gated RMSNorm; output
    projection. Heads = model.n_heads, each of width mamba2.expand * d_model / n_heads."""

    name, code, Config = "mamba2", "m", Mamba2Config
    output = "w_out"
    adaptable = {"w_z": 1, "w_x": 1, "w_b": 1, "w_c": 1, "w_dt": 1, "w_out": 1}

    @classmethod
    def validate(cls, cfg: "ModelConfig") -> None:
        m = cfg.mamba2
        for key in ("state", "expand", "conv", "chunk"):
            if getattr(m, key) <= 0:
                raise ConfigError(f"model.mamba2.{key} must be positive, got {getattr(m, key)}")
        if (m.expand * cfg.d_model) % cfg.n_heads:
            raise ConfigError(f"model.n_heads={cfg.n_heads} must divide the Mamba-2 inner "
                              f"width mamba2.expand * d_model = {m.expand * cfg.d_model}")

    @classmethod
    def extra_flops_per_token(cls, cfg: "ModelConfig", seq_len: int) -> float:
        m = cfg.mamba2
        width = m.expand * cfg.d_model // cfg.n_heads
        return scan_flops_per_token(cfg, seq_len, m.chunk, cfg.n_heads, m.state, width)

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cdt = DTYPES[cfg.compute_dtype]
        m = cfg.mamba2
        d, n, h = cfg.d_model, m.state, cfg.n_heads
        di = m.expand * d
        self.heads, self.head_width, self.state, self.inner = h, di // h, n, di
        self.chunk, self.impl, self.conv_width = m.chunk, m.scan_impl, m.conv
        std = hidden_std(cfg, d)
        self.w_z = param(rngs, (d, di), ("embed", "mlp"), std, pdt)
        self.w_x = param(rngs, (d, di), ("embed", "mlp"), std, pdt)
        self.w_b = param(rngs, (d, n), ("embed", "head_dim"), std, pdt)
        self.w_c = param(rngs, (d, n), ("embed", "head_dim"), std, pdt)
        self.w_dt = param(rngs, (d, h), ("embed", "heads"), std, pdt)
        conv_std = 1.0 / math.sqrt(m.conv)
        self.conv_x = param(rngs, (m.conv, di), ("conv", "mlp"), conv_std, pdt)
        self.conv_bc = param(rngs, (m.conv, 2 * n), ("conv", "head_dim"),
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

    def init_slot_cache(self, slots: int, pages: int, page_size: int) -> dict:
        return self.init_cache(slots)  # one recurrent state per slot; no pages

    def init_cache(self, batch: int, length: int = 0) -> dict:
        return {"ssm": jnp.zeros((batch, self.heads, self.state, self.head_width), jnp.float32),
                "conv_x": jnp.zeros((batch, self.conv_width - 1, self.inner), self.cdt),
                "conv_bc": jnp.zeros((batch, self.conv_width - 1, 2 * self.state), self.cdt)}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del positions_BT, cache_index  # order is implicit in the recurrence
        cdt = self.cdt
        b, t, _ = x_BTD.shape
        h, p, n = self.heads, self.head_width, self.state
        z = _proj(x_BTD, self.w_z[...].astype(cdt))
        xs = _proj(x_BTD, self.w_x[...].astype(cdt))
        bc = jnp.concatenate([_proj(x_BTD, self.w_b[...].astype(cdt)),
                              _proj(x_BTD, self.w_c[...].astype(cdt))], axis=-1)
        dt = jax.nn.softplus(_proj(x_BTD, self.w_dt[...].astype(cdt)).astype(jnp.float32)
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
        y, ssm = sharded_linear_scan(q_BTGN, k_BTGN, (x_BTHP * dt[..., None]).astype(cdt),
                                     log_decay, segment_ids=segment_ids_BT,
                                     initial_state=cache["ssm"], chunk_size=self.chunk,
                                     impl=self.impl)
        y = y + x_BTHP * self.skip[...].astype(cdt)[:, None]
        y = self.out_norm(y.reshape(b, t, h * p) * jax.nn.silu(z))
        out = _proj(y, self.w_out[...].astype(cdt))
        new_cache = {"ssm": ssm, "conv_x": conv_x, "conv_bc": conv_bc} if decoding else None
        return out, new_cache, jnp.float32(NO_LOGIT)
