"""Ring attention over the `sequence` mesh axis (mesh.sequence_attention = ring).

With the all-gather path (the default) every sequence shard gathers the whole sequence's
keys and values and scores its queries against all of them: per-device memory grows with
the full length. Here each shard keeps its own K/V block and the blocks travel around
the ring (`jax.lax.ppermute` inside `jax.shard_map`), one hop per step; each shard folds
the block it holds into its queries' output with the online softmax (running max, sum
and weighted values, as flash attention does over key blocks). Per device only one
block of scores exists at a time: [T/n, T/2n] (zig-zag halves, below) instead of
[T/n, T]. The block itself is materialised (XLA einsums), so memory still grows as
(T/n)^2 per device; a flash kernel per block, merged by the same lse, would remove that.

Causal load balance (zig-zag, as in Llama 3's context parallelism): the sequence is cut
into 2n chunks and shard i holds chunks i and 2n-1-i, so every shard has the same number
of visible (query, key) pairs. After the diagonal step, a visiting block is either wholly
before both of this shard's chunks (its first chunk is seen by all our queries, its
second by none) or it holds the later chunks (only our second chunk sees it, wholly):
each step is exactly half a block of work, on every shard, and the other half is skipped
(`lax.cond` on the ring step). The layout is applied per call with two ppermutes (from
the contiguous shards GSPMD gives) to queries, keys, values, positions and segment ids
together, and undone on the output.

Overlap: the next hop's ppermute is issued before the current block is computed, so XLA
can run the transfer (an async collective-permute) during the block's matmuls.

Backward (custom_vjp): the ring again, recomputing each block's probabilities from the
saved log-sum-exp; the key/value gradients travel with their blocks and arrive home
after the n-th hop. Nothing of size T per device is saved, so memory per device stays
flat as the sequence grows with the axis.

Masking is the model's (lm/model/mixers/attention.py): query i sees key j iff j <= i (row
index), equal segment ids and, with a window, pos_i - pos_j < window or pos_j < sinks
(document-relative positions). Letters: B batch, C chunk (T / 2n), K kv heads, G query
heads per kv head, D head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.errors import ConfigError
from lm.parallel.sharding import active_mesh, shard_axes, spec_for_names

MODES = ("allgather", "ring")
NEG_INF = -1e30
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("lmlab_sequence_attention",
                                                            default="allgather")


@contextlib.contextmanager
def sequence_attention(mode: str):
    """Within this context (while tracing), attention with the sequence sharded uses
    `mode`: 'allgather' (gather K/V along the sequence) or 'ring'."""
    if mode not in MODES:
        raise ConfigError(f"mesh.sequence_attention must be one of {', '.join(MODES)}, "
                          f"got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def sequence_attention_mode() -> str:
    return _MODE.get()


# ------------------------------------------------------------------ zig-zag layout

def _zigzag_perms(n: int):
    """Where each shard's first and second half go (a shard of the contiguous layout
    holds chunks 2d and 2d+1; zig-zag shard j wants chunks j and 2n-1-j)."""
    dest = lambda chunk: chunk if chunk < n else 2 * n - 1 - chunk  # noqa: E731
    first = [(d, dest(2 * d)) for d in range(n)]
    second = [(d, dest(2 * d + 1)) for d in range(n)]
    return first, second


def _to_zigzag(tree, axis, n, me):
    """Contiguous shards -> zig-zag shards, along axis 1 of every leaf."""
    first, second = _zigzag_perms(n)
    c = jax.tree.leaves(tree)[0].shape[1] // 2
    r1 = jax.lax.ppermute(jax.tree.map(lambda x: x[:, :c], tree), axis, first)
    r2 = jax.lax.ppermute(jax.tree.map(lambda x: x[:, c:], tree), axis, second)
    even = me % 2 == 0  # even shards get their first chunk through `first`
    return jax.tree.map(lambda a, b: jnp.where(even, jnp.concatenate([a, b], 1),
                                               jnp.concatenate([b, a], 1)), r1, r2)


def _from_zigzag(x, axis, n, me):
    """Zig-zag shards -> contiguous shards (the inverse of `_to_zigzag`), along axis 1."""
    first, second = _zigzag_perms(n)
    c = x.shape[1] // 2
    even = me % 2 == 0
    via_first = jnp.where(even, x[:, :c], x[:, c:])
    via_second = jnp.where(even, x[:, c:], x[:, :c])
    inv = lambda perm: [(dst, src) for src, dst in perm]  # noqa: E731
    a = jax.lax.ppermute(via_first, axis, inv(first))
    b = jax.lax.ppermute(via_second, axis, inv(second))
    return jnp.concatenate([a, b], 1)


# ------------------------------------------------------------------ one block

def _mask(q_meta, k_meta, window, sinks):
    """bool [B, Tq, Tk] from (index, position, segment) of queries and keys."""
    (qi, qp, qs), (ki, kp, ks) = q_meta, k_meta
    mask = (qi[:, :, None] >= ki[:, None, :]) & (qs[:, :, None] == ks[:, None, :])
    if window:
        mask &= (qp[:, :, None] - kp[:, None, :] < window) | (kp[:, None, :] < sinks)
    return mask


def _scores(q_BKGTD, k_BKSD, scale, softcap):
    """Scaled (and capped) logits, and the raw ones' tanh for the cap's derivative."""
    s = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD,
                   preferred_element_type=jnp.float32) * scale
    if not softcap:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _slices(case: str, c: int):
    """(query rows, key columns) of a block that a ring step computes: 'all' on the
    diagonal step, 'early' for a block before this shard's chunks (every query, the
    block's first chunk), 'late' for a block of later chunks (our second chunk, every
    key)."""
    return {"all": (slice(0, 2 * c), slice(0, 2 * c)),
            "early": (slice(0, 2 * c), slice(0, c)),
            "late": (slice(c, 2 * c), slice(0, 2 * c))}[case]


def _meta_rows(meta, sl):
    return tuple(m[:, sl] for m in meta)


def _fwd_block(case, state, q, k, v, q_meta, k_meta, *, c, scale, softcap, window, sinks):
    """Fold one key/value block into the running (max m, sum l, values acc, max logit)."""
    m, l, acc, mx = state
    rows, cols = _slices(case, c)
    s, _ = _scores(q[:, :, :, rows], k[:, :, cols], scale, softcap)
    mask = _mask(_meta_rows(q_meta, rows), _meta_rows(k_meta, cols), window, sinks)[:, None, None]
    s = jnp.where(mask, s, NEG_INF)
    m_old = m[..., rows]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m_old - m_new)
    l_new = l[..., rows] * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[:, :, cols],
                    preferred_element_type=jnp.float32)
    acc_new = acc[..., rows, :] * alpha[..., None] + pv
    return (m.at[..., rows].set(m_new), l.at[..., rows].set(l_new),
            acc.at[..., rows, :].set(acc_new), jnp.maximum(mx, jnp.max(s)))


def _bwd_block(case, grads, q, k, v, q_meta, k_meta, do, lse, delta, *, c, scale, softcap,
               window, sinks):
    """Add one block's contribution to dq (ours) and dk, dv (the visiting block's)."""
    dq, dk, dv = grads
    rows, cols = _slices(case, c)
    qr, kc, vc = q[:, :, :, rows], k[:, :, cols], v[:, :, cols]
    s, tanh = _scores(qr, kc, scale, softcap)
    mask = _mask(_meta_rows(q_meta, rows), _meta_rows(k_meta, cols), window, sinks)[:, None, None]
    p = jnp.where(mask, jnp.exp(s - lse[..., rows, None]), 0.0)
    dor = do[:, :, :, rows]
    dv_blk = jnp.einsum("bkgts,bkgtd->bksd", p.astype(dor.dtype), dor,
                        preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", dor, vc, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., rows, None])
    if softcap:
        ds = ds * (1.0 - tanh * tanh)
    ds = ds * scale
    dq_blk = jnp.einsum("bkgts,bksd->bkgtd", ds.astype(kc.dtype), kc,
                        preferred_element_type=jnp.float32)
    dk_blk = jnp.einsum("bkgts,bkgtd->bksd", ds.astype(qr.dtype), qr,
                        preferred_element_type=jnp.float32)
    return (dq.at[:, :, :, rows].add(dq_blk), dk.at[:, :, cols].add(dk_blk),
            dv.at[:, :, cols].add(dv_blk))


def _ring_step(t, me, n, run_case):
    """Step t of the ring: the diagonal block at t = 0, then an early or a late block."""
    if t == 0:
        return run_case("all")
    src = (me - t) % n
    return jax.lax.cond(src < me, lambda: run_case("early"), lambda: run_case("late"))


# ------------------------------------------------------------------ the ring core

def _make_core(axis, n, c, scale, softcap, window, sinks):
    """The per-shard ring attention on zig-zag shards, with its custom backward.
    q [B, K, G, 2C, D], k/v [B, K, 2C, D], meta = (index, position, segment) [B, 2C]."""
    shift = [(i, (i + 1) % n) for i in range(n)]
    kw = dict(c=c, scale=scale, softcap=softcap, window=window, sinks=sinks)

    def forward(q, k, v, meta):
        me = jax.lax.axis_index(axis)
        b, kv, g, t2, d = q.shape
        state = (jnp.full((b, kv, g, t2), NEG_INF, jnp.float32),
                 jnp.zeros((b, kv, g, t2), jnp.float32),
                 jnp.zeros((b, kv, g, t2, d), jnp.float32), jnp.float32(NEG_INF))
        block = (k, v, meta)
        for t in range(n):
            # Issue the next hop first, so that the transfer overlaps this block's work.
            nxt = jax.lax.ppermute(block, axis, shift) if t < n - 1 else None
            bk, bv, bmeta = block
            state = _ring_step(t, me, n, lambda case, s=state, bk=bk, bv=bv, bm=bmeta:
                               _fwd_block(case, s, q, bk, bv, meta, bm, **kw))
            block = nxt
        m, l, acc, mx = state
        l_safe = jnp.where(l == 0, 1.0, l)
        out = (acc / l_safe[..., None]).astype(q.dtype)
        lse = jnp.where(l == 0, NEG_INF, m + jnp.log(l_safe))
        return out, lse, mx

    @jax.custom_vjp
    def core(q, k, v, meta):
        out, _, mx = forward(q, k, v, meta)
        return out, mx

    def core_fwd(q, k, v, meta):
        out, lse, mx = forward(q, k, v, meta)
        return (out, mx), (q, k, v, meta, out, lse)

    def core_bwd(res, cts):
        q, k, v, meta, out, lse = res
        do = cts[0].astype(q.dtype)
        me = jax.lax.axis_index(axis)
        delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        dq = jnp.zeros(q.shape, jnp.float32)
        block = (k, v, meta)
        dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        for t in range(n):
            nxt = jax.lax.ppermute(block, axis, shift) if t < n - 1 else None
            bk, bv, bmeta = block
            dq, dk, dv = _ring_step(t, me, n, lambda case, g=(dq, *dkv), bk=bk, bv=bv, bm=bmeta:
                                    _bwd_block(case, g, q, bk, bv, meta, bm, do, lse, delta, **kw))
            # The block's gradients travel with it; after the n-th hop they are home.
            dkv = jax.lax.ppermute((dk, dv), axis, shift)
            block = nxt
        dk, dv = dkv
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)

    core.defvjp(core_fwd, core_bwd)
    return core


def ring_attention(q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, *, scale: float,
                   window: int = 0, sinks: int = 0, softcap: float = 0.0):
    """Causal self-attention with the sequence sharded over the active mesh (see the
    module docstring) -> (out [B, T, H, D], max logit). Call it while tracing under
    `activation_sharding` with the "seq" dimension sharded; K/V heads must be sharded
    like the query heads (Attention._kv_for_heads)."""
    mesh = active_mesh()
    b, t, h, d = q_BTHD.shape
    axes = shard_axes("seq", t)
    n = math.prod(mesh.shape[a] for a in axes)
    if t % (2 * n):
        raise ConfigError(f"mesh.sequence_attention=ring needs the sequence length ({t}) to "
                          f"divide by 2 x the sequence shards ({n}): the zig-zag layout")
    axis = axes[0] if len(axes) == 1 else axes
    core = _make_core(axis, n, t // (2 * n), float(scale), float(softcap), int(window),
                      int(sinks))
    index_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def local(q, k, v, index, pos, seg):
        me = jax.lax.axis_index(axis)
        q, k, v, meta = _to_zigzag((q, k, v, (index, pos.astype(jnp.int32),
                                              seg.astype(jnp.int32))), axis, n, me)
        lb, lt, lh, _ = q.shape
        lkv = k.shape[2]
        q5 = q.reshape(lb, lt, lkv, lh // lkv, d).transpose(0, 2, 3, 1, 4)
        out, mx = core(q5, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), meta)
        out = out.transpose(0, 3, 1, 2, 4).reshape(lb, lt, lh, d)
        return _from_zigzag(out, axis, n, me), jax.lax.pmax(jax.lax.stop_gradient(mx),
                                                           tuple(mesh.axis_names))

    q_spec = spec_for_names(("batch", "seq", "heads", "head_dim"), q_BTHD.shape)
    kv_spec = spec_for_names(("batch", "seq", "kv_heads", "head_dim"), k_BTKD.shape)
    row_spec = spec_for_names(("batch", "seq"), (b, t))
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec),
                         out_specs=(q_spec, P()), check_vma=False)(
        q_BTHD, k_BTKD, v_BTKD, index_BT, positions_BT, segment_ids_BT)
