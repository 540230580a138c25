"""Paged K/V: the cache an attention layer decodes from in the batched engine (lm/infer),
and the attention over it.

Keys and values live in one pool of fixed-size pages shared by every sequence, laid out
as JAX's TPU ragged paged attention kernel wants them: `kv` [pages, page_size, 2 * KV,
head_dim], keys at the even and values at the odd combined heads (k0 v0 k1 v1 ...), so
the TPU kernel reads the pool without a copy. Page 0 is the trash page: never handed to a
sequence, it takes the writes of padding and of idle rows.

A step's tokens attend to three parts, each a softmax over its own keys, combined by
log-sum-exp (exact: a softmax over a union of disjoint key sets):
- **in-row**: this step's own tokens (same segment, causal): a packed prefill row, or
  the one token a decode row feeds;
- **own pages**: decode only, each row's cached keys read through its page table row
  (positions `read_from + r`, those before the fed token);
- **shared prefix** (Hydragen, arXiv:2402.05099): groups of sequences whose first pages
  are the same physical pages. Each group's prefix keys are gathered once and every query
  of the step meets them in one matrix-matrix product (masked to its own group), instead
  of each row gathering its own copy of the prefix. Prefill uses it too: a prompt whose
  leading pages are already cached (another request's few-shot prefix) reads them here
  and feeds only its own suffix.
The three parts together equal ordinary causal attention over the whole sequence
(tests/unit/test_paged.py checks it with GQA, windows, sinks and the soft cap).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

TRASH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclass
class PageStep:
    """Where a step's tokens write and what they read (built by the engine per step).

    write_page [B, T]: the page each token's K/V goes to (TRASH_PAGE for padding); the
        slot in it is position % page_size.
    read_table [B, Mr], read_from [B]: decode rows read their cached keys from these
        pages, the first holding position read_from (width 0 in a prefill: a prompt's
        earlier tokens are in its row or in its group's prefix).
    group [B, T]: the shared-prefix group of each token (-1: none).
    group_table [G, Mp], group_len [G]: each group's prefix pages and length in tokens
        (whole pages); a token of group g reads its keys at positions < group_len[g]
        there (G = 0: no groups this step).
    """
    write_page: jax.Array
    read_table: jax.Array
    read_from: jax.Array
    group: jax.Array
    group_table: jax.Array
    group_len: jax.Array


@jax.tree_util.register_dataclass
@dataclass
class PagedKV:
    """kv: [pages, page_size, 2 * KV, head_dim] (a leading layer axis when the layers
    are scanned); step: the step's PageStep, None while stored between steps."""
    kv: jax.Array
    step: PageStep | None = None

    @property
    def page_size(self) -> int:
        return self.kv.shape[-3]

    @staticmethod
    def zeros(pages: int, page_size: int, kv_heads: int, head_dim: int, dtype) -> "PagedKV":
        return PagedKV(jnp.zeros((pages, page_size, 2 * kv_heads, head_dim), dtype))

    def write(self, k_BTKD, v_BTKD, positions_BT) -> "PagedKV":
        """This step's keys and values, written at their pages (padding: the trash page)."""
        b, t, kd, dh = k_BTKD.shape
        both = jnp.stack([k_BTKD, v_BTKD], axis=3).reshape(b * t, 2 * kd, dh)  # k0 v0 k1 v1
        page = self.step.write_page.reshape(-1)
        slot = (positions_BT % self.page_size).reshape(-1)
        return PagedKV(self.kv.at[page, slot].set(both.astype(self.kv.dtype)), self.step)

    def gather(self, table_NM):
        """Keys and values of the pages in `table_NM`, dense: [N, M * page_size, KV, Dh]."""
        n, m = table_NM.shape
        p, ps, heads, dh = self.kv.shape
        both = self.kv.reshape(p, ps, heads // 2, 2, dh)  # combined head 2j + c -> (j, c)
        # One gather each (the pages' keys, their values): no gathered copy to split.
        k, v = both[table_NM, :, :, 0], both[table_NM, :, :, 1]
        return (k.reshape(n, m * ps, heads // 2, dh), v.reshape(n, m * ps, heads // 2, dh))


NEG_INF = -1e30  # finite: a fully masked part gives exp(NEG_INF - m) = 0, not NaN


def _part(q_BTKGD, k_BSKD, v_BSKD, mask_BTS, scale, softcap, shared: bool):
    """One part's unnormalised softmax: (max [B,K,G,T], sum, out [B,T,K,G,D]).
    shared: k/v are [N, S, K, D] read by every query (the mask picks which), the scores
    one product [B*T*K*G, D] x [D, N*S] (Hydragen's matrix-matrix form)."""
    if shared:
        s = jnp.einsum("btkgd,nskd->bkgtns", q_BTKGD, k_BSKD,
                       preferred_element_type=jnp.float32)
        s = s.reshape(*s.shape[:4], -1)
        k_BSKD = k_BSKD.reshape(1, -1, *k_BSKD.shape[2:])
        v_BSKD = v_BSKD.reshape(1, -1, *v_BSKD.shape[2:])
        eq = "bkgts,skd->btkgd"
    else:
        s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
        eq = "bkgts,bskd->btkgd"
    s = s * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask_BTS[:, None, None], s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    vv = v_BSKD[0] if shared else v_BSKD
    o = jnp.einsum(eq, p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1), o


def _reach(q_pos, k_pos, window: int, sinks: int):
    if not window:
        return True
    return (q_pos - k_pos < window) | (k_pos < sinks)


def _has_groups(st: PageStep) -> bool:
    return bool(st.group_table.shape[0] and st.group_table.shape[-1])


def attend(q_BTHD, k_BTKD, v_BTKD, positions_BT, segments_BT, cache: PagedKV, *,
           scale: float, window: int = 0, sinks: int = 0, softcap: float = 0.0,
           impl: str = "xla", device_kind: str | None = None):
    """Attention of a step's queries over their sequences through the pages, the step's
    keys written first (so a prompt may read a shared prefix another prompt of the same
    prefill writes). Returns (out_BTHD, new_cache, max_logit).

    impl "auto"/"pallas": a decode step without Hydragen groups or sink tokens runs JAX's
    TPU ragged paged attention kernel when compiling for a TPU that takes the settings
    (kernels/attention/paged.py; its max logit is not reported: NaN); everything else,
    and every step on CPU/GPU, is the XLA path below."""
    new = cache.write(k_BTKD, v_BTKD, positions_BT)
    st = cache.step
    b, t, h, dh = q_BTHD.shape
    kv = k_BTKD.shape[2]
    if t == 1 and impl != "xla" and not sinks and st.read_table.shape[-1] and \
            not _has_groups(st):
        from lm.kernels.attention import paged as kernel
        chosen = kernel.choose_impl(impl, head_dim=dh, heads=h, kv_heads=kv,
                                    dtype=q_BTHD.dtype, kv_dtype=new.kv.dtype, window=window,
                                    softcap=softcap)
        if chosen == "pallas":
            return (_kernel_decode(kernel, q_BTHD, new.kv, positions_BT, st.read_table,
                                   scale, window, softcap, device_kind),
                    new, jnp.float32(jnp.nan))
    q = q_BTHD.reshape(b, t, kv, h // kv, dh)
    valid = segments_BT > 0
    parts = []
    # In-row: same segment, causal, in reach.
    mask = (segments_BT[:, :, None] == segments_BT[:, None, :]) & valid[:, None, :] & (
        positions_BT[:, None, :] <= positions_BT[:, :, None]) & _reach(
        positions_BT[:, :, None], positions_BT[:, None, :], window, sinks)
    parts.append(_part(q, k_BTKD, v_BTKD, mask, scale, softcap, shared=False))
    if st.read_table.shape[-1]:  # own pages (decode rows)
        k, v = new.gather(st.read_table)
        k_pos = st.read_from[:, None] + jnp.arange(k.shape[1])[None, :]  # [B, S]
        mask = (k_pos[:, None, :] < positions_BT[:, :, None]) & _reach(
            positions_BT[:, :, None], k_pos[:, None, :], window, sinks)
        parts.append(_part(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale, softcap,
                           shared=False))
    if _has_groups(st):  # shared prefixes (Hydragen)
        k, v = new.gather(st.group_table)  # [G, Sp, K, D]: once for all queries
        g_n, sp = k.shape[:2]
        k_pos = jnp.arange(sp)
        mine = st.group[:, :, None] == jnp.arange(g_n)[None, None, :]  # [B, T, G]
        inside = k_pos[None, :] < st.group_len[:, None]  # [G, Sp]
        mask = mine[..., None] & inside[None, None] & _reach(
            positions_BT[:, :, None, None], k_pos[None, None, None, :], window, sinks)
        parts.append(_part(q, k.astype(q.dtype), v.astype(q.dtype),
                           mask.reshape(b, t, g_n * sp), scale, softcap, shared=True))
    out, max_logit = _combine(parts, valid)
    return out.reshape(b, t, h, dh).astype(q_BTHD.dtype), new, max_logit


def _kernel_decode(kernel, q_BTHD, kv_pool, positions_BT, table_BM, scale, window, softcap,
                   device_kind):
    """One decode token a row through the TPU kernel, per shard of the mesh (rows by
    "batch", heads by "heads"/"kv_heads": a Pallas call is not partitioned by GSPMD).
    A row's table covers its fed position (the engine's read_table does)."""
    from lm.parallel.sharding import shard_local

    def local(q_BHD, pool, pos_B, table):
        n = q_BHD.shape[0]
        return kernel.paged_attention(
            q_BHD, pool, pos_B + 1, table, jnp.arange(n + 1, dtype=jnp.int32),
            jnp.asarray([n], jnp.int32), scale=scale, window=window, softcap=softcap,
            impl="pallas", device_kind=device_kind)

    out = shard_local(local, (("batch", "heads", "head_dim"),
                              (None, None, "kv_heads", "head_dim"), ("batch",),
                              ("batch", None)), ("batch", "heads", "head_dim"))(
        q_BTHD[:, 0], kv_pool, positions_BT[:, 0], table_BM)
    return out[:, None]


def _combine(parts, valid_BT):
    """Log-sum-exp combination of the parts' partial softmaxes; the largest logit of a
    valid query (the max-logit diagnostic)."""
    m = parts[0][0]
    for pm, _, _ in parts[1:]:
        m = jnp.maximum(m, pm)
    total = jnp.zeros_like(m)
    out = 0.0
    for pm, pl, po in parts:
        w = jnp.exp(pm - m)  # [B,K,G,T]
        total = total + w * pl
        out = out + po * jnp.moveaxis(w, 3, 1)[..., None]
    denom = jnp.moveaxis(jnp.maximum(total, 1e-30), 3, 1)[..., None]
    max_logit = jnp.max(jnp.where(valid_BT[:, None, None, :], m, NEG_INF))
    return out / denom, max_logit
