"""Dense masked attention in plain jnp: the ground truth for the Pallas kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lm.kernels.segments import document_starts


def document_layout(segment_ids, batch: int, length: int):
    """-> (doc [B, T] int32, pos [B, T] int32).

    `doc` numbers the maximal runs of equal consecutive segment ids 1, 2, ... per row;
    `pos` is the index within the run. With segment_ids=None the row is one document.
    """
    idx = jnp.arange(length, dtype=jnp.int32)
    starts = document_starts(segment_ids, batch, length)
    doc = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return doc, idx - first


def visibility(doc, pos, *, causal: bool, window: int, sinks: int):
    """-> bool [B, T, S]: may query i attend to key j (see `attention_reference`)."""
    t = doc.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    mask = doc[:, :, None] == doc[:, None, :]
    if causal:
        mask &= (j <= i)[None]
    if window:
        near = pos[:, :, None] - pos[:, None, :] < window
        if sinks:
            near |= (pos < sinks)[:, None, :]
        mask &= near
    return mask


def check_shapes(q, k, v):
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, S, KV, D] matching q [B, T, H, D]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[1] != t:
        raise ValueError(f"self-attention only: q has T={t} but k/v have S={k.shape[1]}")
    if h % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({h})")


def attention_reference(q, k, v, *, segment_ids=None, causal=True, window=0, sinks=0,
                        scale=None, softcap=0.0):
    """Dense attention -> (out [B,T,H,D] in q.dtype, lse [B,H,T] f32, row_max [B,H,T] f32).

    q [B, T, H, D]; k, v [B, T, KV, D], query head h reads kv head h // (H // KV).
    Key j is visible to query i iff both are in the same document (a maximal run of
    equal consecutive segment ids; for ids that are distinct per document, as the data
    pipeline produces, this is seg[i] == seg[j]) and (not causal or j <= i) and
    (window == 0 or pos[i] - pos[j] < window or pos[j] < sinks), with pos the index
    within the document. softcap > 0 caps the scaled logits to softcap * tanh(s / softcap)
    (Gemma 2) before the softmax. lse / row_max are the log-sum-exp / max of the (scaled,
    capped) visible logits; a row with no visible key gets out 0 and lse = row_max = -inf.
    Everything is computed in f32; gradients flow through `out` only.
    """
    check_shapes(q, k, v)
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    doc, pos = document_layout(segment_ids, b, t)
    mask = visibility(doc, pos, causal=causal, window=window, sinks=sinks)[:, None, None]

    f32 = jnp.float32
    q5 = q.astype(f32).reshape(b, t, n_kv, h // n_kv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q5, k.astype(f32)) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    # -inf (not a large finite value) so that exp() of masked logits is exactly 0 and
    # its derivative there is 0 too, instead of 0 * inf = NaN.
    s = jnp.where(mask, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1)
    m = jax.lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0.0, row_max))
    p = jnp.exp(s - m[..., None])
    denom = jnp.sum(p, axis=-1)
    empty = denom == 0
    denom = jnp.where(empty, 1.0, denom)
    p = p / denom[..., None]
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(f32)).reshape(b, t, h, d)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(denom))
    return (out.astype(q.dtype), jax.lax.stop_gradient(lse.reshape(b, h, t)),
            jax.lax.stop_gradient(row_max.reshape(b, h, t)))
