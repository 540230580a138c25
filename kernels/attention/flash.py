"""Flash attention in Pallas: forward and FlashAttention-2 style backward.

Written against the generic Pallas API (program_id, BlockSpec index maps, pl.ds ref
slices) so that the same kernels run in interpret mode on CPU and lower through the
Triton backend on GPU. For Triton, block_q, block_k and the head dim must be powers
of two (>= 16 for tl.dot); the wrapper pads the sequence and the head dim to satisfy it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lm.kernels.attention.reference import (
    attention_reference,
    check_shapes,
    document_layout,
)
from lm.kernels.dispatch import GPU_COMPILER_PARAMS, interpret_default, resolve, target_platform

F32 = jnp.float32
NEG_INF = -jnp.inf


class _Cfg(NamedTuple):
    causal: bool
    window: int
    sinks: int
    scale: float
    block_q: int
    block_k: int
    seq_len: int      # real (unpadded) length
    groups: int       # query heads per kv head
    interpret: bool
    softcap: float = 0.0  # > 0: logits -> softcap * tanh(logits / softcap)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32)


def _block_mask(qb, kb, doc_ref, pos_ref, cfg: _Cfg, padded_len: int):
    """bool [block_q, block_k] for query block qb x key block kb, or None if all-true.

    Inside one document pos[i] - pos[j] == i - j, so the window test can use raw
    indices; only the sink test needs document-relative key positions.
    """
    bq, bk = cfg.block_q, cfg.block_k
    qi = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kj = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    conds = []
    if cfg.seq_len < padded_len:
        conds.append(kj < cfg.seq_len)  # padding keys are never visible
    if cfg.causal:
        conds.append(kj <= qi)
    if doc_ref is not None:
        conds.append(doc_ref[pl.ds(qb * bq, bq)][:, None] == doc_ref[pl.ds(kb * bk, bk)][None, :])
    if cfg.window:
        near = qi - kj < cfg.window
        if cfg.sinks:
            kpos = kj if pos_ref is None else pos_ref[pl.ds(kb * bk, bk)][None, :]
            near = near | (kpos < cfg.sinks)
        conds.append(near)
    return functools.reduce(jnp.logical_and, conds) if conds else None


def _if_visible(mask, fn, carry):
    """fn(carry) unless the block is fully masked; jnp.max over int32 because Triton has
    no lowering for reduce_or (jnp.any)."""
    if mask is None:
        return fn(carry)
    return lax.cond(jnp.max(mask.astype(jnp.int32)) > 0, fn, lambda c: c, carry)


def _kv_blocks(qb, cfg: _Cfg):
    """[lo, hi) of key blocks a query block can see; qb is traced, hence lax.div."""
    bq, bk = cfg.block_q, cfg.block_k
    hi = pl.cdiv(cfg.seq_len, bk)
    if cfg.causal:
        hi = jnp.minimum(hi, lax.div((qb + 1) * bq + bk - 1, bk))
    lo = 0
    if cfg.window and not cfg.sinks:  # sinks keep the first keys of any document alive
        lo = lax.div(jnp.maximum(qb * bq - cfg.window + 1, 0), bk)
    return lo, hi


def _q_blocks(kb, cfg: _Cfg):
    """[lo, hi) of query blocks that can see key block kb."""
    bq, bk = cfg.block_q, cfg.block_k
    hi = pl.cdiv(cfg.seq_len, bq)
    lo = lax.div(kb * bk, bq) if cfg.causal else 0
    if cfg.window and not cfg.sinks:
        hi = jnp.minimum(hi, lax.div(kb * bk + bk + cfg.window - 2, bq) + 1)
    return lo, hi


def _fwd_kernel(q_ref, k_ref, v_ref, doc_ref, pos_ref, o_ref, lse_ref, max_ref, *, cfg):
    bq, bk = cfg.block_q, cfg.block_k
    qb = pl.program_id(2)
    q = q_ref[...]

    def body(kb, carry):
        mask = _block_mask(qb, kb, doc_ref, pos_ref, cfg, k_ref.shape[0])

        def update(carry):
            acc, m, l = carry
            k = k_ref[pl.ds(kb * bk, bk), :]
            v = v_ref[pl.ds(kb * bk, bk), :]
            s = _capped(_dot(q, k.T) * cfg.scale, cfg)[0]
            if mask is not None:
                s = jnp.where(mask, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # Rows with nothing visible yet keep m = -inf; shift by 0 instead so that
            # exp(-inf - -inf) never produces NaN.
            shift = jnp.where(m_new == NEG_INF, 0.0, m_new)
            p = jnp.exp(s - shift[:, None])
            alpha = jnp.exp(m - shift)
            acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
            return acc, m_new, alpha * l + jnp.sum(p, axis=1)

        return _if_visible(mask, update, carry)

    init = (jnp.zeros(q.shape, F32), jnp.full((bq,), NEG_INF, F32), jnp.zeros((bq,), F32))
    acc, m, l = lax.fori_loop(*_kv_blocks(qb, cfg), body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log(l_safe))
    max_ref[...] = m


def _capped(s, cfg):
    """(logits after the soft cap, d capped / d raw or None without a cap)."""
    if not cfg.softcap:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, 1.0 - t * t


def _probs(q, k, lse, mask, cfg):
    """Recomputed softmax probabilities of one block from the saved row lse, and the soft
    cap's derivative (None without one). Rows with lse = -inf are fully masked, so the
    where() also hides their exp(+inf)."""
    s, dcap = _capped(_dot(q, k.T) * cfg.scale, cfg)
    p = jnp.exp(s - lse[:, None])
    return (p if mask is None else jnp.where(mask, p, 0.0)), dcap


def _dq_kernel(q_ref, k_ref, v_ref, doc_ref, pos_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, cfg):
    bk = cfg.block_k
    qb = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(kb, dq):
        mask = _block_mask(qb, kb, doc_ref, pos_ref, cfg, k_ref.shape[0])

        def update(dq):
            k = k_ref[pl.ds(kb * bk, bk), :]
            v = v_ref[pl.ds(kb * bk, bk), :]
            p, dcap = _probs(q, k, lse, mask, cfg)
            ds = p * (_dot(do, v.T) - delta[:, None])
            ds = ds if dcap is None else ds * dcap
            return dq + _dot(ds.astype(k.dtype), k)

        return _if_visible(mask, update, dq)

    dq = lax.fori_loop(*_kv_blocks(qb, cfg), body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, doc_ref, pos_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg):
    bq = cfg.block_q
    kb = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def body(qb, carry):
        mask = _block_mask(qb, kb, doc_ref, pos_ref, cfg, q_ref.shape[0])

        def update(carry):
            dk, dv = carry
            q = q_ref[pl.ds(qb * bq, bq), :]
            do = do_ref[pl.ds(qb * bq, bq), :]
            p, dcap = _probs(q, k, lse_ref[pl.ds(qb * bq, bq)], mask, cfg)
            ds = p * (_dot(do, v.T) - delta_ref[pl.ds(qb * bq, bq)][:, None])
            ds = ds if dcap is None else ds * dcap
            return dk + _dot(ds.astype(q.dtype).T, q), dv + _dot(p.astype(do.dtype).T, do)

        return _if_visible(mask, update, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(*_q_blocks(kb, cfg), body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(cfg: _Cfg, t: int, d: int, blocked: str):
    """BlockSpecs (q-like, kv-like, per-row stats, per-token ids) for a (b, h, i) grid
    whose axis i walks the `blocked` side ('q' or 'k'); the other side is loaded whole
    and sliced inside the kernel."""
    g = cfg.groups
    bq, iq = (cfg.block_q, lambda i: i) if blocked == "q" else (t, lambda i: 0)
    bk, ik = (cfg.block_k, lambda i: i) if blocked == "k" else (t, lambda i: 0)
    return (pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, iq(i), h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda b, h, i: (b, ik(i), lax.div(h, g), 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, iq(i))),
            pl.BlockSpec((None, t), lambda b, h, i: (b, 0)))


def _fwd_call(q, k, v, doc, pos, cfg: _Cfg):
    b, t, h, d = q.shape
    q_spec, kv_spec, row_spec, ids_spec = _specs(cfg, t, d, "q")
    row = jax.ShapeDtypeStruct((b, h, t), F32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, h, t // cfg.block_q),
        in_specs=[q_spec, kv_spec, kv_spec,
                  None if doc is None else ids_spec, None if pos is None else ids_spec],
        out_specs=[q_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), row, row],
        interpret=cfg.interpret,
        compiler_params=GPU_COMPILER_PARAMS,
        name="flash_attention_fwd",
    )(q, k, v, doc, pos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, doc, pos, cfg):
    return tuple(_fwd_call(q, k, v, doc, pos, cfg))


def _flash_fwd(q, k, v, doc, pos, cfg):
    out, lse, row_max = _fwd_call(q, k, v, doc, pos, cfg)
    return (out, lse, row_max), (q, k, v, doc, pos, out, lse)


def _flash_bwd(cfg, res, cts):
    # Only d_out is used: lse and row_max are diagnostics, treated as constants.
    q, k, v, doc, pos, out, lse = res
    do = cts[0].astype(q.dtype)
    b, t, h, d = q.shape
    delta = jnp.einsum("bthd,bthd->bht", out.astype(F32), do.astype(F32))
    ins = (q, k, v, doc, pos, do, lse, delta)

    q_spec, kv_spec, row_spec, ids_spec = _specs(cfg, t, d, "q")
    ids = [None if doc is None else ids_spec, None if pos is None else ids_spec]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, h, t // cfg.block_q),
        in_specs=[q_spec, kv_spec, kv_spec, *ids, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret,
        compiler_params=GPU_COMPILER_PARAMS,
        name="flash_attention_dq",
    )(*ins)

    # dk/dv per query head (f32, summed over each kv group below): no cross-program
    # accumulation, so no atomics are needed.
    q_spec, kv_spec, row_spec, ids_spec = _specs(cfg, t, d, "k")
    per_head = pl.BlockSpec((None, cfg.block_k, None, d), lambda b, h, i: (b, i, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, h, t // cfg.block_k),
        in_specs=[q_spec, kv_spec, kv_spec, *ids, q_spec, row_spec, row_spec],
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct(q.shape, F32)] * 2,
        interpret=cfg.interpret,
        compiler_params=GPU_COMPILER_PARAMS,
        name="flash_attention_dkv",
    )(*ins)
    n_kv = k.shape[2]
    dk = dk.reshape(b, t, n_kv, cfg.groups, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, t, n_kv, cfg.groups, d).sum(3).astype(v.dtype)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_attention(q, k, v, *, interpret=None, **kw):
    """See `_flash_attention`. interpret=None: interpret mode iff the target platform is
    the CPU (kernels/dispatch.py), decided here, outside the jit: its trace cache does not
    see the target platform."""
    return _flash_attention(q, k, v, interpret=interpret_default() if interpret is None
                            else bool(interpret), **kw)


@functools.partial(jax.jit, static_argnames=(
    "causal", "window", "sinks", "scale", "softcap", "block_q", "block_k", "interpret",
    "return_stats"))
def _flash_attention(q, k, v, *, segment_ids=None, causal=True, window=0, sinks=0, scale=None,
                     softcap=0.0,
                     block_q=64, block_k=64, interpret=False, return_stats=False):
    """Pallas flash attention with the semantics of `attention_reference`.

    Returns out [B, T, H, D] (q.dtype), or (out, lse, row_max) with return_stats=True.
    Differentiable w.r.t. q, k, v via custom_vjp; lse and row_max are treated as
    non-differentiable (their cotangents are ignored). block_q / block_k must be
    powers of two; T is padded up to a multiple of both and D up to a power of two.
    """
    check_shapes(q, k, v)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 1 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two, got {blk}")
    b, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # Shrink blocks for short sequences rather than pad them to a full block, but not
    # below 16, the smallest tile tl.dot accepts.
    cap = max(16, _pow2(t))
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    tp = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    dp = _pow2(d)

    doc = pos = None
    if segment_ids is not None:
        doc, pos = document_layout(segment_ids, b, t)
        # Sentinel document for padding (real documents are numbered from 1).
        doc = jnp.pad(doc, ((0, 0), (0, tp - t)), constant_values=-1)
        pos = jnp.pad(pos, ((0, 0), (0, tp - t))) if window and sinks else None

    def pad(x):  # also unifies dtypes: Triton's dot needs equal operand types
        return jnp.pad(x.astype(q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, dp - d)))

    cfg = _Cfg(bool(causal), int(window), int(sinks), scale, block_q, block_k, t,
               h // k.shape[2], bool(interpret), float(softcap))
    out, lse, row_max = _flash(pad(q), pad(k), pad(v), doc, pos, cfg)
    out, lse, row_max = out[:, :t, :, :d], lse[:, :, :t], row_max[:, :, :t]
    return (out, lse, row_max) if return_stats else out


_KERNEL_ONLY = ("block_q", "block_k", "interpret", "return_stats", "device_kind")


def attention(q, k, v, *, impl="auto", **kw):
    """-> (out, lse, row_max). impl: 'pallas', 'xla' (the dense reference) or 'auto'
    (see kernels/dispatch.py: pallas on GPU and TPU, xla on CPU). 'pallas' is, by the
    target platform: the Triton-style flash_attention on GPU (interpret mode on CPU),
    splash attention (kernels/attention/splash.py) on TPU. Kernel-only options (block
    sizes, interpret, device_kind: the TPU generation for splash's block table) are
    ignored by the paths they do not apply to."""
    if resolve("flash_attention", impl, pallas_on=("gpu", "cpu", "tpu")) == "pallas":
        if target_platform() == "tpu":
            from lm.kernels.attention.splash import splash_attention
            kw = {name: x for name, x in kw.items()
                  if name not in ("block_q", "block_k", "return_stats")}
            return splash_attention(q, k, v, **kw)
        kw.pop("device_kind", None)
        return flash_attention(q, k, v, **{**kw, "return_stats": True})
    kw = {name: x for name, x in kw.items() if name not in _KERNEL_ONLY}
    return attention_reference(q, k, v, **kw)
