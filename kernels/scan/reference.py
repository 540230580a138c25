"""Plain-jnp references for the linear-recurrence scan.

Recurrence, per batch row and head h (q and k may be shared by a group of heads, as in
GQA / Mamba-2's B and C groups):

    S_t = exp(a_t) * S_{t-1} + k_t^T v_t        S: [Dk, Dv]
    o_t = q_t S_t

S_{-1} is the initial state; a token whose segment id differs from the previous token's
starts a new document, which resets the state to zero first (the initial state flows
only into the first document). Returns (o [B, T, H, Dv], S_{T-1} [B, H, Dk, Dv]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels.segments import document_starts


def reset_flags(segment_ids_BT, length: int, batch: int):
    """[B, T] bool: True where a token starts a new document (never at t = 0, so that an
    initial state passed in flows into the first document)."""
    return document_starts(segment_ids_BT, batch, length).at[:, 0].set(False)


def _heads(q_BTGK, n_heads: int):
    return jnp.repeat(q_BTGK, n_heads // q_BTGK.shape[2], axis=2)


def _prepare(q, k, v, log_decay, segment_ids, initial_state):
    b, t, h, dv = v.shape
    dk = q.shape[-1]
    q, k = _heads(q, h).astype(jnp.float32), _heads(k, h).astype(jnp.float32)
    a = log_decay.astype(jnp.float32)
    keep = ~reset_flags(segment_ids, t, b)
    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    return q, k, v.astype(jnp.float32), a, keep, s0


def scan_reference(q, k, v, log_decay, *, segment_ids=None, initial_state=None):
    """Token-by-token `lax.scan`: the definition, in float32."""
    dtype = v.dtype
    q, k, v, a, keep, s0 = _prepare(q, k, v, log_decay, segment_ids, initial_state)

    def step(s_BHKV, xs):
        q_t, k_t, v_t, a_t, keep_t = xs
        decay = jnp.where(keep_t[:, None], jnp.exp(a_t), 0.0)[:, :, None, None]
        s_BHKV = decay * s_BHKV + k_t[..., :, None] * v_t[..., None, :]
        return s_BHKV, jnp.einsum("bhk,bhkv->bhv", q_t, s_BHKV)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, a, keep))
    s_final, o_TBHV = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o_TBHV, 0, 1).astype(dtype), s_final


def scan_associative(q, k, v, log_decay, *, segment_ids=None, initial_state=None):
    """The same recurrence with `lax.associative_scan` over (decay, state) pairs: log-depth
    but materialises every state [B, T, H, Dk, Dv] (the benchmark's second baseline)."""
    dtype = v.dtype
    q, k, v, a, keep, s0 = _prepare(q, k, v, log_decay, segment_ids, initial_state)
    decay_BTH = jnp.where(keep[:, :, None], jnp.exp(a), 0.0)
    kv_BTHKV = k[..., :, None] * v[..., None, :]
    # Fold the initial state into the first step's update.
    kv_BTHKV = kv_BTHKV.at[:, 0].add(decay_BTH[:, 0, :, None, None] * s0)

    def combine(left, right):
        d1, s1 = left
        d2, s2 = right
        return d1 * d2, d2[..., None, None] * s1 + s2

    _, states = jax.lax.associative_scan(combine, (decay_BTH, kv_BTHKV), axis=1)
    o = jnp.einsum("bthk,bthkv->bthv", q, states)
    return o.astype(dtype), states[:, -1]
