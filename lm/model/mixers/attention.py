"""Causal softmax self-attention (mixer code "a", section model.attention): GQA/MQA,
RoPE, qk-norm, packed-document masking, a sliding window with sink tokens (in every
layer, or local layers among global ones: window_pattern), and a KV cache for decoding.

The `xla` implementation materialises the scores (in causal query blocks), which also
gives the per-layer maximum attention logit that stability studies track. `pallas` is,
by the platform the step is compiled for (kernels/dispatch.py): on GPU the Triton-style
flash kernel of kernels/attention (which returns the row maxima too), on TPU splash
attention (kernels/attention/splash.py; the row maxima come from a separate exact XLA
pass over the visible blocks: one QK^T matmul, 1/9 of splash's training FLOPs), on CPU
the flash kernel in interpret mode (slow: tests). The kernel runs per shard
(`shard_local`: batch rows over data/fsdp, heads over tensor; kv heads that do not
divide by the tensor axis are repeated to the fewest copies that do, so that each shard
holds the kv heads of its query heads). With the sequence sharded (mesh.sequence > 1)
the xla path is used instead, logged; mesh.sequence_attention=ring runs ring attention
(lm/parallel/ring.py) there instead of gathering K/V. `auto`, the
default, is pallas on GPU and TPU and xla on CPU, where the XLA path is the fast one.
`cudnn` is jax.nn.dot_product_attention's cuDNN path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lm.errors import ConfigError
from lm.schema import knob
from lm.model.layers import DTYPES, Norm, hidden_std, param, rope
from lm.model.mixers.base import SequenceMixer, register
from lm.model import paged
from lm.model.paged import PagedKV
from lm.parallel.ring import ring_attention, sequence_attention_mode
from lm.parallel.sharding import active_mesh, constrain, is_sharded, shard_axes, shard_local

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

NEG_INF = -1e30
log = logging.getLogger("lmlab.model")
_LOGGED: set[str] = set()


@jax.custom_vjp
def _softmax(scores):
    """Softmax over the last axis, and each row's maximum (the logit diagnostic: no
    gradient flows through it). The backward is written out as p * (g - sum(g * p)):
    autodiff of exp-and-normalise leaves XLA:CPU more passes over the score tensor
    (about 10% of the attention core's time)."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - row_max)
    # One reciprocal per row and a multiply: a divide per score is ~20% slower on CPU.
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True)), row_max


def _softmax_fwd(scores):
    probs, row_max = _softmax(scores)
    return (probs, row_max), probs


def _softmax_bwd(probs, cotangents):
    d_probs, _ = cotangents
    return (probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def masked_softmax(scores, mask):
    """Softmax over keys with masked entries excluded, and the largest unmasked logit.

    The row maxima that make the softmax stable double as the max-logit diagnostic
    (one reduction fewer than jax.nn.softmax plus a separate masked max). An additive
    mask bias was tried instead of the select and was ~20% slower on XLA:CPU.
    """
    probs, row_max = _softmax(jnp.where(mask, scores, NEG_INF))
    return probs, jnp.max(row_max)


def query_blocks(t: int, n_blocks: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of `n_blocks` near-equal query blocks covering 0..t (0: auto,
    blocks of at least 128 queries and at most 8 of them)."""
    n = n_blocks or min(8, t // 128)
    n = max(1, min(n, t))
    edges = [round(i * t / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class AttentionConfig:
    """Causal softmax self-attention (mixer code "a")."""
    impl: Literal["auto", "xla", "pallas", "cudnn"] = knob(
        "auto", roles={"free_init", "eval_time"},
        doc="auto: pallas on GPU/TPU, xla on CPU; xla: materialised scores (any backend); "
            "pallas: flash attention on GPU (interpret mode on CPU), splash attention on "
            "TPU; cudnn: jax.nn.dot_product_attention's cuDNN path (NVIDIA GPUs only; no "
            "sinks, no max-logit diagnostic).")
    q_blocks: int = knob(
        0, roles={"free_init", "eval_time"},
        doc="xla training attention: queries in this many blocks, each scoring only the "
            "keys causality leaves it (1 = one dense score matrix; 0 = auto: blocks of >= "
            "128 queries, at most 8, which measured best on CPU at seq 256).")
    window: int = knob(0, roles={"free_init", "eval_time"},
                       doc="0 = full causal attention; w = see the last w tokens.")
    sinks: int = knob(0, roles={"free_init", "eval_time"},
                      doc="With a window: the first s tokens of a document stay visible.")
    window_pattern: str = knob(
        "", roles={"free_init", "eval_time"},
        doc="With a window: which layers use it, by letter, cycled over the layers: l = "
            "local (the window), g = global (full causal attention). \"\" = every layer "
            "local; \"lg\" = alternating (Gemma 2); \"lllllg\" = Gemma 3's 5:1.")
    local_rope_theta: float = knob(
        0.0, roles={"free_init"},
        doc="> 0: the local (windowed) layers' RoPE base frequency, without "
            "model.rope_scaling, which then applies to the global layers only (Gemma 3's "
            "rope_local_base_freq); 0 = every layer uses model.rope_theta and its scaling.")
    scale_dim: float = knob(
        0.0, doc="Attention logits are q.k / sqrt(scale_dim); 0 = head_dim (HF Gemma's "
                 "query_pre_attn_scalar). Not with model.init=mup.")
    softcap: float = knob(
        0.0, doc="> 0: attention logits -> softcap * tanh(logits / softcap) (Gemma 2); the "
                 "max-logit diagnostic then reports the capped logits, the ones the softmax "
                 "sees. Not with cudnn.")
    qkv_bias: bool = knob(False, doc="Learned biases on the q, k and v projections (Qwen2; "
                                     "no bias on the output).")

    legacy: ClassVar[dict[str, str]] = {
        "attention_impl": "impl", "attention_q_blocks": "q_blocks",
        "attention_window": "window", "attention_sinks": "sinks"}


def _mean_visible_keys(seq_len: int, window: int) -> float:
    """Keys a query sees on average under causal masking (and a window)."""
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    w = window  # queries 0..w-1 see i + 1 keys, the rest see w
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


@register
class Attention(SequenceMixer):
    name, code, Config = "attention", "a", AttentionConfig
    output = "wo"
    adaptable = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}

    @classmethod
    def validate(cls, cfg: "ModelConfig") -> None:
        a = cfg.attention
        for key in ("window", "sinks", "q_blocks"):
            if getattr(a, key) < 0:
                raise ConfigError(f"model.attention.{key} must be >= 0, got {getattr(a, key)}")
        if a.softcap < 0:
            raise ConfigError(f"model.attention.softcap must be >= 0, got {a.softcap}")
        if a.impl == "cudnn" and a.softcap:
            raise ConfigError("model.attention.impl=cudnn does not support softcap "
                              "(use auto, pallas or xla)")
        if a.sinks and not a.window:
            raise ConfigError("model.attention.sinks needs model.attention.window > 0")
        if set(a.window_pattern) - set("lg"):
            raise ConfigError(f"model.attention.window_pattern={a.window_pattern!r} must be a "
                              "string of l (local: the window) and g (global)")
        for key in ("window_pattern", "local_rope_theta"):
            if getattr(a, key) and not a.window:
                raise ConfigError(f"model.attention.{key} needs model.attention.window > 0")
        if a.local_rope_theta < 0 or a.scale_dim < 0:
            key = "local_rope_theta" if a.local_rope_theta < 0 else "scale_dim"
            raise ConfigError(f"model.attention.{key} must be >= 0, got {getattr(a, key)}")
        if a.scale_dim and cfg.init == "mup":
            raise ConfigError("model.attention.scale_dim sets the logit scale that "
                              "model.init=mup sets (use one of them)")
        if a.impl == "cudnn" and a.sinks:
            raise ConfigError("model.attention.impl=cudnn does not support sinks "
                              "(use pallas or xla)")
        if cfg.n_heads % cfg.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={cfg.kv_heads} must divide model.n_heads={cfg.n_heads}")

    @classmethod
    def layer_config(cls, cfg: "ModelConfig", layer: int) -> "ModelConfig":
        """window_pattern: a global layer sees no window (and no sinks); a local one, with
        local_rope_theta, has its own unscaled RoPE."""
        import dataclasses

        from lm.model.rope_scaling import RopeScaling
        a = cfg.attention
        if not a.window:
            return cfg
        pattern = a.window_pattern or "l"
        if pattern[layer % len(pattern)] == "g":
            return dataclasses.replace(cfg, attention=dataclasses.replace(
                a, window=0, sinks=0, window_pattern="", local_rope_theta=0.0))
        if a.local_rope_theta:
            return dataclasses.replace(cfg, rope_theta=a.local_rope_theta,
                                       rope_scaling=RopeScaling(), attention=dataclasses.replace(
                                           a, window_pattern="", local_rope_theta=0.0))
        return dataclasses.replace(cfg, attention=dataclasses.replace(a, window_pattern=""))

    @classmethod
    def extra_flops_per_token(cls, cfg: "ModelConfig", seq_len: int) -> float:
        """Scores and values: 2 matmuls of 2 * keys * head_dim per head, x3 for training,
        over the keys a query sees (causal: about half the sequence; PaLM appendix B)."""
        keys = _mean_visible_keys(seq_len, cfg.attention.window)
        return 6 * 2 * keys * cfg.n_heads * cfg.dh

    @classmethod
    def reports_logits(cls, cfg: "ModelConfig") -> bool:
        return cfg.attention.impl != "cudnn"  # cuDNN does not expose the logits

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.compute_dtype = DTYPES[cfg.compute_dtype]
        self.n_heads, self.n_kv, self.dh = cfg.n_heads, cfg.kv_heads, cfg.dh
        self.rope_theta, self.max_len = cfg.rope_theta, cfg.max_seq_len
        self.rope_scaling = cfg.rope_scaling
        a = cfg.attention
        self.impl, self.window, self.sinks, self.q_blocks = a.impl, a.window, a.sinks, a.q_blocks
        self.softcap = float(a.softcap)
        if self.impl == "cudnn" and jax.default_backend() != "gpu":
            raise ConfigError("model.attention.impl=cudnn needs an NVIDIA GPU; this backend "
                              f"is {jax.default_backend()} (use xla or pallas)")
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dh
        std = hidden_std(cfg, d)
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, pdt)
        self.wk = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), std, pdt)
        out_std = hidden_std(cfg, h * dh) / math.sqrt(2 * cfg.n_layers)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.qkv_bias = a.qkv_bias
        if a.qkv_bias:  # flat [heads * head_dim]: 1-D, so no weight decay (lm/optim)
            self.bq = param(rngs, (h * dh,), ("heads",), 0.0, pdt)
            self.bk = param(rngs, (kv * dh,), ("kv_heads",), 0.0, pdt)
            self.bv = param(rngs, (kv * dh,), ("kv_heads",), 0.0, pdt)
        self.qk_norm = cfg.qk_norm and cfg.qk_norm_scope
        if self.qk_norm == "head":
            self.q_norm = Norm(dh, cfg.norm, "head_dim", pdt, cfg.norm_eps)
            self.k_norm = Norm(dh, cfg.norm, "head_dim", pdt, cfg.norm_eps)
        elif self.qk_norm == "all":  # over all heads at once: flat, like the biases
            self.q_norm = Norm(h * dh, cfg.norm, "heads", pdt, cfg.norm_eps)
            self.k_norm = Norm(kv * dh, cfg.norm, "kv_heads", pdt, cfg.norm_eps)
        if a.scale_dim:
            self.scale = 1.0 / math.sqrt(a.scale_dim)
        elif cfg.init == "mup":
            # muP: logits scale as 1/head_dim; equal to 1/sqrt(head_dim) at the base width.
            base_dh = cfg.mup_base_width / cfg.n_heads
            self.scale = math.sqrt(base_dh) / dh
        else:
            self.scale = 1.0 / math.sqrt(dh)

    def projections(self, x_BTD):
        """The raw query, key and value projections of x (biases added; before qk-norm
        and RoPE), each flat over its heads: [B, T, heads * head_dim] (keys and values:
        kv_heads * head_dim). MiniLM's attention relations are taken of these, so they
        do not depend on how the width is split into heads."""
        cdt = self.compute_dtype
        b, t = x_BTD.shape[:2]
        out = []
        for w, bias in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")):
            y = jnp.einsum("btd,dhk->bthk", x_BTD, getattr(self, w)[...].astype(cdt))
            y = y.reshape(b, t, -1)
            if self.qkv_bias:
                y = y + getattr(self, bias)[...].astype(cdt)
            out.append(y)
        return tuple(out)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        """Returns (y_BTD, new_cache, max_logit).

        Training: `cache is None`; query i sees key j iff j <= i and both belong to the
        same document (equal segment ids).
        Decoding: `cache = {"k": [B,S,KV,Dh], "v": ...}`; the new keys are written at
        `cache_index` and each query sees cache slots up to its own position.
        Paged decoding (lm/infer): `cache` is a PagedKV; the new keys are written at their
        positions through its page table (padding, segment id 0, to the trash page) and
        each query sees its row's pages up to its own position.
        """
        cdt = self.compute_dtype
        q_BTHD = jnp.einsum("btd,dhk->bthk", x_BTD, self.wq[...].astype(cdt))
        k_BTKD = jnp.einsum("btd,dhk->bthk", x_BTD, self.wk[...].astype(cdt))
        v_BTKD = jnp.einsum("btd,dhk->bthk", x_BTD, self.wv[...].astype(cdt))
        if self.qkv_bias:
            q_BTHD = q_BTHD + self.bq[...].astype(cdt).reshape(self.n_heads, self.dh)
            k_BTKD = k_BTKD + self.bk[...].astype(cdt).reshape(self.n_kv, self.dh)
            v_BTKD = v_BTKD + self.bv[...].astype(cdt).reshape(self.n_kv, self.dh)
        if self.qk_norm == "head":
            q_BTHD, k_BTKD = self.q_norm(q_BTHD), self.k_norm(k_BTKD)
        elif self.qk_norm == "all":
            b, t = q_BTHD.shape[:2]
            q_BTHD = self.q_norm(q_BTHD.reshape(b, t, -1)).reshape(q_BTHD.shape)
            k_BTKD = self.k_norm(k_BTKD.reshape(b, t, -1)).reshape(k_BTKD.shape)
        q_BTHD = rope(q_BTHD, positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling)
        k_BTKD = rope(k_BTKD, positions_BT, self.rope_theta, self.max_len,
                     self.rope_scaling)
        if cache is None and is_sharded("seq", q_BTHD.shape[1]) and \
                sequence_attention_mode() == "ring":
            out_BTHD, max_logit = ring_attention(
                q_BTHD, *self._kv_for_heads(k_BTKD, v_BTKD), positions_BT, segment_ids_BT,
                scale=self.scale, window=self.window, sinks=self.sinks, softcap=self.softcap)
            return self._project_out(out_BTHD), None, max_logit
        # Sequence parallelism: queries stay sharded along the sequence; keys and
        # values are all-gathered along it (the "seq" name is absent), so each shard
        # attends its queries to the whole (causally masked) sequence.
        q_BTHD = constrain(q_BTHD, ("batch", "seq", "heads", "head_dim"))
        k_BTKD = constrain(k_BTKD, ("batch", None, "kv_heads", "head_dim"))
        v_BTKD = constrain(v_BTKD, ("batch", None, "kv_heads", "head_dim"))
        k_positions_BT = constrain(positions_BT, ("batch", None))
        k_segment_ids_BT = constrain(segment_ids_BT, ("batch", None))

        if cache is None and self._training_impl(q_BTHD.shape[1]) != "xla":
            y_BTD, max_logit = self._fused(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
            return y_BTD, None, max_logit
        if cache is None:
            out_BTHD, max_logit = self._causal_blocks(
                q_BTHD, k_BTKD, v_BTKD, positions_BT, k_positions_BT, segment_ids_BT,
                k_segment_ids_BT)
            return self._project_out(out_BTHD), None, max_logit

        if isinstance(cache, PagedKV):  # the batched engine's pages (lm/model/paged.py)
            mesh = active_mesh()
            out_BTHD, new_cache, max_logit = paged.attend(
                q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, cache,
                scale=self.scale, window=self.window, sinks=self.sinks, softcap=self.softcap,
                impl="xla" if self.impl == "xla" else "auto",
                device_kind=mesh.devices.flat[0].device_kind if mesh is not None else None)
            return self._project_out(out_BTHD), new_cache, max_logit
        k_all = jax.lax.dynamic_update_slice(
            cache["k"], k_BTKD.astype(cache["k"].dtype), (0, cache_index, 0, 0))
        v_all = jax.lax.dynamic_update_slice(
            cache["v"], v_BTKD.astype(cache["v"].dtype), (0, cache_index, 0, 0))
        new_cache = {"k": k_all, "v": v_all}
        k_BTKD, v_BTKD = k_all.astype(cdt), v_all.astype(cdt)
        slots = jnp.arange(k_all.shape[1])[None, None, :]
        mask_BTS = (slots <= positions_BT[:, :, None]) & self._window(
            positions_BT[:, :, None], slots)
        b, t, h, dh = q_BTHD.shape
        q_BTKGD = q_BTHD.reshape(b, t, self.n_kv, h // self.n_kv, dh)
        scores = self._cap(jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD,
                                      preferred_element_type=jnp.float32) * self.scale)
        probs, max_logit = masked_softmax(scores, mask_BTS[:, None, None])
        out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs.astype(cdt), v_BTKD)
        return self._project_out(out_BTKGD.reshape(b, t, h, dh)), new_cache, max_logit

    def _causal_blocks(self, q_BTHD, k_BTKD, v_BTKD, positions_BT, k_positions_BT,
                       segment_ids_BT, k_segment_ids_BT):
        """Training attention over materialised scores, one block of queries at a time.

        Query i sees key j iff j <= i, both are in the same document (equal segment
        ids) and, with a window, j is within reach (positions are document-relative).
        Query block [lo, hi) therefore only scores keys [k_lo, hi): causality hides the
        keys after it (and a window without sinks those long before it), which skips
        (n - 1) / 2n of the score matmuls and softmax work for n blocks (with the written-
        out softmax backward and the heads-major layout, the attention core's forward
        and backward run 2x faster on CPU at seq 256). Under sequence parallelism the queries
        are sharded along the sequence, so they are kept whole (one block).
        """
        cdt = self.compute_dtype
        b, t, h, dh = q_BTHD.shape
        kv, g = self.n_kv, h // self.n_kv
        # Heads-major layout: each (batch, head) pair is one contiguous matmul.
        q_BKGTD = q_BTHD.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4)
        k_BKSD, v_BKSD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)
        index = jnp.arange(t)
        n_blocks = 1 if is_sharded("seq", t) else self.q_blocks
        outs, maxes = [], []
        for lo, hi in query_blocks(t, n_blocks):
            k_lo = max(0, lo - self.window + 1) if self.window and not self.sinks else 0
            mask_BTS = (index[lo:hi, None] >= index[None, k_lo:hi]) & (
                segment_ids_BT[:, lo:hi, None] == k_segment_ids_BT[:, None, k_lo:hi])
            mask_BTS &= self._window(positions_BT[:, lo:hi, None],
                                     k_positions_BT[:, None, k_lo:hi])
            scores = self._cap(jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD[:, :, :, lo:hi],
                                          k_BKSD[:, :, k_lo:hi],
                                          preferred_element_type=jnp.float32) * self.scale)
            probs, max_logit = masked_softmax(scores, mask_BTS[:, None, None])
            outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(cdt), v_BKSD[:, :, k_lo:hi]))
            maxes.append(max_logit)
        out_BKGTD = jnp.concatenate(outs, axis=3)
        out_BTHD = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
        return out_BTHD, jnp.max(jnp.stack(maxes))

    def _training_impl(self, seq_len: int) -> str:
        """'xla', 'pallas' or 'cudnn' for training attention in the program being traced."""
        if self.impl == "cudnn":
            return "cudnn"
        from lm.kernels.dispatch import resolve
        impl = resolve("attention", self.impl, pallas_on=("gpu", "cpu", "tpu"))
        if impl == "pallas" and is_sharded("seq", seq_len):
            if "seq" not in _LOGGED:
                _LOGGED.add("seq")
                log.warning("model.attention: the Pallas kernels do not run with the sequence "
                            "sharded (mesh.sequence > 1; mesh.sequence_attention=ring avoids it): "
                            "using the xla path")
            return "xla"
        return impl

    def _kv_for_heads(self, k_BTKD, v_BTKD):
        """K/V whose kv-head shards line up with the query heads' shards under tensor
        parallelism: kv heads that do not divide by the heads' mesh axes are repeated to
        the fewest copies that do (lcm(KV, shards) heads), so that shard s holds exactly
        the kv heads its query heads read (query head h -> kv head h // (H / KV'))."""
        h_axes = shard_axes("heads", self.n_heads)
        if not h_axes or shard_axes("kv_heads", self.n_kv) == h_axes:
            return k_BTKD, v_BTKD
        mesh = active_mesh()
        n = math.prod(mesh.shape[a] for a in h_axes)
        r = n // math.gcd(self.n_kv, n)
        if shard_axes("kv_heads", self.n_kv * r) != h_axes:
            raise ConfigError(f"mesh.rules: kv_heads must be sharded like heads ({h_axes}) "
                              "for model.attention.impl=pallas")
        return jnp.repeat(k_BTKD, r, axis=2), jnp.repeat(v_BTKD, r, axis=2)

    def _cap(self, scores):
        """The logit soft cap (identity without one)."""
        if not self.softcap:
            return scores
        return self.softcap * jnp.tanh(scores / self.softcap)

    def _window(self, q_pos, k_pos):
        """Sliding window (with LM-Infinite sink tokens): True where a key is in reach."""
        if not self.window:
            return True
        return (q_pos - k_pos < self.window) | (k_pos < self.sinks)

    def _project_out(self, out_BTHD):
        out_BTHD = constrain(out_BTHD, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bthk,hkd->btd", out_BTHD, self.wo[...].astype(self.compute_dtype))

    def _fused(self, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
        """Attention without materialised scores: the Pallas flash kernel (which also
        returns each row's max logit) or cuDNN (which does not: the diagnostic is NaN).
        Both derive causality and the window from segment ids (document-relative
        positions), which matches the xla mask for packed rows."""
        if self.impl != "cudnn":
            from lm.kernels.attention import attention
            from lm.kernels.dispatch import target_platform
            mesh = active_mesh()
            # The TPU generation picks splash's block sizes (topology devices have it too).
            kind = (mesh.devices.flat[0].device_kind
                    if mesh is not None and target_platform() == "tpu" else None)

            def local(q, k, v, seg):
                out, _, row_max = attention(
                    q, k, v, impl="pallas", segment_ids=seg, causal=True, window=self.window,
                    sinks=self.sinks, scale=self.scale, softcap=self.softcap, device_kind=kind)
                return out, row_max

            # Pallas kernels are custom calls: run per shard, not replicated by GSPMD.
            q_names = ("batch", None, "heads", "head_dim")
            kv_names = ("batch", None, "kv_heads", "head_dim")
            out, row_max = shard_local(
                local, (q_names, kv_names, kv_names, ("batch", None)),
                (q_names, ("batch", "heads", None)))(
                    q_BTHD, *self._kv_for_heads(k_BTKD, v_BTKD), segment_ids_BT)
            return self._project_out(out), jnp.max(row_max)
        same_doc = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        out = jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, mask=same_doc[:, None], scale=self.scale, is_causal=True,
            local_window_size=(self.window - 1, 0) if self.window else None,
            implementation="cudnn")
        return self._project_out(out), jnp.float32(jnp.nan)

    def init_slot_cache(self, slots: int, pages: int, page_size: int) -> PagedKV:
        return PagedKV.zeros(pages, page_size, self.n_kv, self.dh, self.compute_dtype)

    def init_cache(self, batch: int, length: int) -> dict:
        shape = (batch, length, self.n_kv, self.dh)
        return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)}
