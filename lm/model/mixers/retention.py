"""RetNet multi-scale retention (code "r", section model.retention), built on the
chunked linear-recurrence scan of kernels/scan.

Training runs the chunked parallel form; decoding continues the scan from the cached
[d_head, d_head] state per head, O(1) per token. The scan resets at document boundaries.

Knobs beyond RetNet turn the mixer into the linear attentions that linearization
(lm/compress/linearize.py, `lm linearize`) trains to imitate softmax attention:
a feature map phi on q and k (elu + 1, or LoLCATs' learnable Hedgehog map
[softmax(x W), softmax(-x W)] per head, W starting at the identity), the linear
attention's normaliser (divide by phi(q_t) . sum_s decay phi(k_s) instead of the
per-head RMSNorm), no swish gate, no decay (gamma = 1). The defaults are RetNet's.
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
    feature_map: Literal["identity", "elu", "hedgehog"] = knob(
        "identity", doc="phi on q and k: identity (RetNet; k scaled by 1/sqrt(d_head)), elu "
                        "(elu(x) + 1), hedgehog (LoLCATs: [softmax(x W), softmax(-x W)] per "
                        "head, a learned W starting at the identity; state width 2 d_head).")
    normalize: Literal["rms", "sum", "none"] = knob(
        "rms", doc="The output per head: rms = RMSNorm (RetNet); sum = divided by phi(q_t) . "
                   "sum_s decay^(t-s) phi(k_s) (linear attention; needs feature_map elu or "
                   "hedgehog); none = as the scan gives it.")
    gate: bool = knob(True, doc="The swish output gate (RetNet); false: no gate matrix.")
    decay: Literal["retnet", "none"] = knob(
        "retnet", doc="retnet: per-head gamma_h = 1 - 2^(-5-h); none: gamma = 1 (plain "
                      "causal linear attention).")
    window: int = knob(
        0, doc="> 0: LoLCATs' sliding window: the last `window` tokens by softmax attention "
               "(exp(q.k / sqrt(d_head) - max)) times a learned per-head factor, the older "
               "ones by the linear part, normalised together (needs normalize=sum); "
               "decoding keeps their K/V beside the state. 0 = linear only.")

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
        r = cfg.retention
        if r.chunk <= 0:
            raise ConfigError(f"model.retention.chunk must be positive, got {r.chunk}")
        if r.normalize == "sum" and r.feature_map == "identity":
            raise ConfigError("model.retention.normalize=sum needs positive features: "
                              "model.retention.feature_map=elu or hedgehog")
        if r.window < 0 or (r.window and r.normalize != "sum"):
            raise ConfigError(f"model.retention.window={r.window} must be >= 0, and > 0 needs "
                              "model.retention.normalize=sum (the two parts share one "
                              "normaliser)")

    @classmethod
    def extra_flops_per_token(cls, cfg: "ModelConfig", seq_len: int) -> float:
        dk = feature_width(cfg)
        window = 6 * 2 * min(cfg.retention.window, seq_len) * cfg.n_heads * cfg.dh  # as attention's
        return window + scan_flops_per_token(cfg, seq_len, cfg.retention.chunk, cfg.n_heads,
                                             dk, cfg.dh)

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cdt = DTYPES[cfg.compute_dtype]
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.dh
        self.heads, self.dh, self.rope_theta = h, dh, cfg.rope_theta
        self.max_len = cfg.max_seq_len
        self.rope_scaling = cfg.rope_scaling
        r = cfg.retention
        self.chunk, self.impl = r.chunk, r.scan_impl
        self.feature_map, self.normalize, self.decay = r.feature_map, r.normalize, r.decay
        self.dk = feature_width(cfg)
        std = hidden_std(cfg, d)
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wk = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wv = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        if r.gate:
            self.wg = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.gate = r.gate
        if r.feature_map == "hedgehog":  # per head, q's and k's own map, from the identity
            eye = jnp.broadcast_to(jnp.eye(dh, dtype=pdt), (h, dh, dh))
            self.fq = nnx.Param(eye, logical_axes=("heads", "head_dim", None))
            self.fk = nnx.Param(eye, logical_axes=("heads", "head_dim", None))
        if r.normalize == "rms":
            self.head_norm = Norm(dh, "rms", "head_dim", pdt)
        self.window = r.window
        if r.window:  # the softmax window's weight against the linear part: sigmoid(wf)
            self.wf = nnx.Param(jnp.zeros((h,), pdt), logical_axes=("heads",))
        out_std = hidden_std(cfg, h * dh) / math.sqrt(2 * cfg.n_layers)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), out_std, pdt)

    def init_slot_cache(self, slots: int, pages: int, page_size: int) -> dict:
        return self.init_cache(slots)  # one recurrent state per slot; no pages

    def init_cache(self, batch: int, length: int = 0) -> dict:
        cache = {"state": jnp.zeros((batch, self.heads, self.dk, self.dh), jnp.float32)}
        if self.normalize == "sum":  # the normaliser's running sum of phi(k)
            cache["norm"] = jnp.zeros((batch, self.heads, self.dk), jnp.float32)
        if self.window:  # the last `window` tokens' rotated keys and values, oldest first
            shape = (batch, self.window, self.heads, self.dh)
            cache.update(k_win=jnp.zeros(shape, self.cdt), v_win=jnp.zeros(shape, self.cdt),
                         valid=jnp.zeros((batch, self.window), bool))
        return cache

    def features(self, x_BTHD, which: str):
        """phi of the (rotated) queries or keys ("q" / "k"), in float32 for the maps."""
        if self.feature_map == "identity":
            return x_BTHD * (self.dh ** -0.5) if which == "k" else x_BTHD
        x = x_BTHD.astype(jnp.float32)
        if self.feature_map == "elu":
            return (jax.nn.elu(x) + 1.0).astype(x_BTHD.dtype)
        w = (self.fq if which == "q" else self.fk)[...].astype(jnp.float32)
        xw = jnp.einsum("bthk,hkf->bthf", x, w)
        return jnp.concatenate([jax.nn.softmax(xw, -1), jax.nn.softmax(-xw, -1)],
                               -1).astype(x_BTHD.dtype)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del cache_index
        cdt = self.cdt
        b, t, _ = x_BTD.shape
        def proj(w):
            return jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(cdt))
        q_raw = rope(proj(self.wq), positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling)
        k_raw = rope(proj(self.wk), positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling)
        if self.decay == "retnet":
            gamma = 1.0 - 2.0 ** (-5.0 - jnp.arange(self.heads, dtype=jnp.float32))
            log_decay = jnp.broadcast_to(jnp.log(gamma), (b, t, self.heads))
        else:
            log_decay = jnp.zeros((b, t, self.heads), jnp.float32)
        if self.window:
            y, new_cache = self._windowed(q_raw, k_raw, proj(self.wv), log_decay,
                                          segment_ids_BT, cache)
            if self.gate:
                y = y * jax.nn.silu(proj(self.wg))
            out = jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(cdt))
            return out, new_cache, jnp.float32(NO_LOGIT)
        q, k = self.features(q_raw, "q"), self.features(k_raw, "k")
        y, state = sharded_linear_scan(q, k, proj(self.wv), log_decay,
                                       segment_ids=segment_ids_BT,
                                       initial_state=None if cache is None else cache["state"],
                                       chunk_size=self.chunk, impl=self.impl)
        new_cache = None if cache is None else {"state": state}
        if self.normalize == "rms":
            y = self.head_norm(y)
        elif self.normalize == "sum":
            z_BTHK, z_last = decayed_sum(k, log_decay, segment_ids_BT,
                                         None if cache is None else cache["norm"])
            den = jnp.einsum("bthk,bthk->bth", q.astype(jnp.float32), z_BTHK)
            y = (y.astype(jnp.float32) / (den[..., None] + NORM_EPS)).astype(y.dtype)
            if cache is not None:
                new_cache["norm"] = z_last
        if self.gate:
            y = y * jax.nn.silu(proj(self.wg))
        out = jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(cdt))
        return out, new_cache, jnp.float32(NO_LOGIT)

    def _windowed(self, q_raw, k_raw, v, log_decay, segment_ids_BT, cache):
        """LoLCATs' sliding-window hybrid. The keys are extended by the W before the
        chunk (the cache's, or none: training) to E = W + T; query i (extended index
        i + W) sees extended keys (i, i + W] by softmax and, through the linear state,
        every key up to extended index i (positions <= t - W), decayed by gamma^W more.
        The cached keys belong to the first token's document (they are its past); the
        cache keeps the last W keys and the state of the last token's document only."""
        b, t, h, _ = v.shape
        w = self.window
        decoding = cache is not None
        cache = cache if decoding else self.init_cache(b)  # training: no past
        seg = segment_ids_BT
        seg_ext = jnp.concatenate([jnp.where(cache["valid"], seg[:, :1], -1), seg], axis=1)
        k_ext = jnp.concatenate([cache["k_win"].astype(k_raw.dtype), k_raw], axis=1)
        v_ext = jnp.concatenate([cache["v_win"].astype(v.dtype), v], axis=1)
        real = (seg_ext >= 0)[..., None, None]
        # Linear part: keys at extended 0..T-1 (positions t - W), queries at T.
        phi_q = self.features(q_raw, "q")
        phi_k = jnp.where(real[:, :t], self.features(k_ext[:, :t], "k"), 0)
        lin, state = sharded_linear_scan(phi_q, phi_k, v_ext[:, :t], log_decay,
                                         segment_ids=seg_ext[:, :t],
                                         initial_state=cache["state"],
                                         chunk_size=self.chunk, impl=self.impl)
        z, z_last = decayed_sum(phi_k, log_decay, seg_ext[:, :t], cache["norm"])
        reach = (seg_ext[:, :t] == seg)[..., None, None].astype(jnp.float32)  # same document
        lag = jnp.exp(w * log_decay)[..., None] * reach  # gamma^W
        num = lin.astype(jnp.float32) * lag
        den = jnp.einsum("bthk,bthk->bth", phi_q.astype(jnp.float32), z)[..., None] * lag
        # Softmax part over the window (extended keys i+1 .. i+W).
        e = jnp.arange(w + t)[None, :]
        i = jnp.arange(t)[:, None]
        mask = ((e > i) & (e <= i + w))[None] & (seg_ext[:, None, :] == seg[:, :, None])
        scores = jnp.einsum("bthk,bshk->bhts", q_raw, k_ext,
                            preferred_element_type=jnp.float32) * (self.dh ** -0.5)
        scores = jnp.where(mask[:, None], scores, -1e30)
        top = jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True))
        a = jnp.where(mask[:, None], jnp.exp(scores - top), 0.0)
        factor = jax.nn.sigmoid(self.wf[...].astype(jnp.float32))[None, :, None, None]
        a = a * factor
        num = num + jnp.einsum("bhts,bshk->bthk", a, v_ext.astype(jnp.float32))
        den = den + jnp.sum(a, -1).transpose(0, 2, 1)[..., None]
        y = (num / (den + NORM_EPS)).astype(v.dtype)
        if not decoding:
            return y, None
        last = seg[:, -1:]
        keep = seg_ext[:, t - 1] == last[:, 0]  # the state's document is the last token's
        new_cache = {
            "state": jnp.where(keep[:, None, None, None], state, 0.0),
            "norm": jnp.where(keep[:, None, None], z_last, 0.0),
            "k_win": k_ext[:, t:].astype(cache["k_win"].dtype),
            "v_win": v_ext[:, t:].astype(cache["v_win"].dtype),
            "valid": seg_ext[:, t:] == last}
        return y, new_cache


NORM_EPS = 1e-6  # keeps normalize=sum finite where phi(q) . z underflows


def feature_width(cfg: "ModelConfig") -> int:
    """The width of phi(q) and phi(k) per head: the state is [this, d_head]."""
    return 2 * cfg.dh if cfg.retention.feature_map == "hedgehog" else cfg.dh


def decayed_sum(k_BTHK, log_decay_BTH, segment_ids_BT, initial_BHK=None):
    """z_t = exp(a_t) z_{t-1} + k_t per head, reset at document starts (the initial
    state flows into the first document only, as in the scan): the normaliser's running
    sum. Returns (z [B, T, H, K] float32, z at the last token)."""
    from lm.kernels.scan.reference import reset_flags
    b, t = k_BTHK.shape[:2]
    keep = ~reset_flags(segment_ids_BT, t, b)
    a = jnp.where(keep[..., None], jnp.exp(log_decay_BTH.astype(jnp.float32)), 0.0)[..., None]
    x = k_BTHK.astype(jnp.float32)
    if initial_BHK is not None:  # fold the carried sum into the first token
        x = x.at[:, 0].add(a[:, 0] * initial_BHK.astype(jnp.float32))

    def combine(left, right):
        (a1, x1), (a2, x2) = left, right
        return a1 * a2, a2 * x1 + x2

    _, z = jax.lax.associative_scan(combine, (jnp.broadcast_to(a, x.shape), x), axis=1)
    return z, z[:, -1]
