"""lmlab attention on TPU through JAX's splash attention kernel (Mosaic TPU).

`splash_attention` has the inputs and semantics of `attention_reference` (packed
documents, causal, a sliding window on document-relative positions, LM-Infinite sink
tokens, GQA/MQA) and returns (out, lse, row_max). How lmlab's masks map onto splash:

* splash takes static masks only (CausalMask / LocalMask, built from numpy at trace
  time) plus SegmentIds for data-dependent document boundaries. lmlab documents are
  runs of equal consecutive segment ids, so they are renumbered 1, 2, ... per row
  (`document_layout`); inside a document pos[i] - pos[j] == i - j, so the window is a
  static LocalMask on raw indices.
* T is padded up to a multiple of the block; padded positions get document 0, which no
  real token has, so they never see nor are seen by real tokens (and every padded query
  sees itself: no empty softmax rows, which splash does not allow).
* splash has no `scale` argument: q is multiplied by it first (so its soft cap, like
  lmlab's, applies to the scaled logits).
* GQA: splash's MHA kernel maps query head h to kv head h // (H // KV) itself (its
  index maps), so K/V are passed as [KV, T, D] and never repeated; KV == 1 uses the
  MQA kernel ([T, D]). Batch rows are a vmap (a grid axis of the pallas_call).
* Sinks with a window cannot be a static mask (document starts are data). The keys a
  query sees split into two disjoint sets: the window (splash: LocalMask + segment
  ids) and the sink keys outside it (at most `sinks` per query: the first tokens of its
  document further back than the window), which are scored densely ([B, H, T, sinks]
  scores, 4 B H T sinks D FLOPs; the gathered sink keys and values are `sinks` times
  the size of K and V). The two parts are merged by their log-sum-exps. The backward of flash
  attention decomposes over disjoint key sets given the GLOBAL output and lse (dS =
  P * (dP - rowsum(dO * O)) with P = exp(s - lse)), so splash's own backward kernels
  are called with the combined output and lse as residuals (`_splash_attention_bwd`, a
  private function: pinned by the JAX version in pyproject and checked against the
  reference's gradients by tests/test_kernels_splash.py), and the sink part's gradients
  come from autodiff of a surrogate with the same fixed lse.
* lse: splash returns it only with save_residuals=True, which its custom_vjp refuses to
  differentiate; so the whole call is one custom_vjp here (forward: splash with
  residuals; backward: splash's backward), which gives lse on every path.
* row_max: splash does not compute row maxima. `logit_row_max` is a separate exact XLA
  pass over the visible (query block, key block) pairs only: one QK^T matmul's worth
  of FLOPs, i.e. 1/9 of splash's training FLOPs for attention (forward 2 matmuls,
  backward 7: dq recomputes QK^T, dO V^T, dS K; dkv QK^T, dO V^T, P^T dO, dS^T Q).
  It runs on every step: the model has no logging-step flag to gate it with (a
  lax.cond on such a flag would make it free on the other steps).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

from lm.kernels.attention.reference import check_shapes, document_layout

F32 = jnp.float32

# Block sizes (queries = keys, forward and backward) per TPU generation, by device_kind
# prefix. Upstream's default is 128 everywhere ("TODO: select better parameters");
# MaxText's base config uses 512 for every splash block (sa_block_q, sa_block_kv,
# *_compute, *_dkv, *_dq) on v4, v5e, v5p and v6e alike, which amortises the per-grid-step
# overhead (~0.35 us) and keeps the MXU fed; at head dim 128 a 512x512 f32 score tile
# plus q/k/v/o tiles is ~2 MiB of VMEM, well inside every generation's scoped VMEM
# (default scoped limits: 16 MiB on v4/v5, 32 MiB on v6e). None of this was measured here (no TPU): the table
# is the place to change it once it is.
BLOCKS = {"TPU v4": 512, "TPU v5 lite": 512, "TPU v5p": 512, "TPU v5": 512,
          "TPU v6 lite": 512, "TPU v6": 512}
DEFAULT_BLOCK = 512
LANES = 128  # splash's kv compute block must be a multiple of the lane count


def block_for(device_kind: str | None, seq_len: int) -> int:
    """The block size for this TPU generation, shrunk (to a multiple of 128) for short
    sequences so that they are not padded to a whole 512 block."""
    block = DEFAULT_BLOCK
    for prefix, b in sorted(BLOCKS.items(), key=lambda kv: -len(kv[0])):
        if device_kind and device_kind.startswith(prefix):
            block = b
            break
    return min(block, -(-seq_len // LANES) * LANES)


class _Cfg(NamedTuple):
    seq_len: int      # padded length
    heads: int
    kv_heads: int
    causal: bool
    window: int
    sinks: int
    block: int
    segmented: bool
    interpret: object  # False, True or a pltpu.InterpretParams (TPU semantics)
    softcap: float = 0.0


@functools.lru_cache(maxsize=64)
def _kernel(cfg: _Cfg) -> sak.SplashAttentionKernel:
    """The splash kernel (mask processing is numpy work at trace time: cached)."""
    t = cfg.seq_len
    if cfg.window:
        mask = sa.LocalMask((t, t), (cfg.window - 1, 0 if cfg.causal else None), offset=0)
    elif cfg.causal:
        mask = sa.CausalMask((t, t))
    else:
        mask = sa.FullMask((t, t))
    b = cfg.block
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    make = sa.make_splash_mqa if cfg.kv_heads == 1 else sa.make_splash_mha
    # Concrete mask arrays even when first built inside a trace (they are cached).
    with jax.ensure_compile_time_eval():
        return make(sa.MultiHeadMask([mask] * cfg.heads), block_sizes=sizes, head_shards=1,
                    q_seq_shards=1, save_residuals=True, interpret=cfg.interpret,
                    attn_logits_soft_cap=cfg.softcap or None)


def _rows(fn, cfg: _Cfg, *args):
    """fn over batch rows: a vmap (on TPU a leading grid axis of each pallas_call, as
    MaxText runs splash), or a lax.map in interpret mode, whose TPU interpreter (JAX
    0.12) does not handle the vmapped grid axis (its dimension_semantics no longer
    match the grid)."""
    if cfg.interpret:
        return lax.map(lambda a: fn(*a), args)
    return jax.vmap(fn)(*args)


def _splash_fwd_batched(cfg, q, k, v, doc):
    """vmap over rows of splash (with residuals) -> (out [B,H,T,D], lse [B,H,T] f32)."""
    kern = _kernel(cfg)

    def one(q, k, v, doc):
        segs = None if doc is None else sa.SegmentIds(q=doc, kv=doc)
        out, (lse,) = kern(q, k, v, segment_ids=segs)
        return out, lse

    if doc is None:
        return _rows(lambda q, k, v: one(q, k, v, None), cfg, q, k, v)
    return _rows(one, cfg, q, k, v, doc)


def _splash_bwd_batched(cfg, q, k, v, doc, out, lse, do):
    """splash's backward kernels for residuals (out, lse) that may be those of a larger
    key set (see the module docstring) -> dq, dk, dv."""
    kern = _kernel(cfg)
    assert not kern.fwd_mask_info.is_dynamic_mask  # static masks: no block collapse
    kw = kern.kwargs

    def one(q, k, v, doc, out, lse, do):
        segs = None if doc is None else sa.SegmentIds(q=doc, kv=doc)
        res = (q, k, v, segs, None, out, lse, kern.dq_mask_info, kern.dkv_mask_info)
        grads = sak._splash_attention_bwd(
            False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
            kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"], res, do)
        return grads[3:6]

    if doc is None:
        return _rows(lambda q, k, v, o, l, g: one(q, k, v, None, o, l, g), cfg,
                     q, k, v, out, lse, do)
    return _rows(one, cfg, q, k, v, doc, out, lse, do)


def _kv_heads_view(x, cfg: _Cfg):
    """[B, KV, T, D] -> what the kernel takes: [B, T, D] for MQA."""
    return x[:, 0] if cfg.kv_heads == 1 else x


def _sink_scores(q, k, pos, cfg: _Cfg):
    """Scores of each query against the sink keys outside its window.

    q [B,H,T,D] (scaled), k [B,KV,T,D] -> (s [B,H,T,S] f32 with -inf where not visible,
    idx [B,T,S] key index). Sink m of query t is key start(t) + m, start(t) = t - pos[t];
    it is outside the window iff pos[t] - m >= window (then it is also causal and in the
    same document)."""
    b, h, t, d = q.shape
    m = jnp.arange(cfg.sinks, dtype=jnp.int32)
    start = jnp.arange(t, dtype=jnp.int32)[None, :] - pos                       # [B,T]
    idx = jnp.minimum(start[:, :, None] + m, t - 1)                              # [B,T,S]
    ok = pos[:, :, None] - m >= cfg.window                                        # [B,T,S]
    k_s = jax.vmap(lambda k, i: k[:, i])(k, idx)                                  # [B,KV,T,S,D]
    g = h // cfg.kv_heads
    q5 = q.reshape(b, cfg.kv_heads, g, t, d)
    s = _cap(jnp.einsum("bkgtd,bktsd->bkgts", q5, k_s, preferred_element_type=F32),
             cfg.softcap)
    s = jnp.where(ok[:, None, None], s, -jnp.inf).reshape(b, h, t, cfg.sinks)
    return s, idx


def _cap(s, softcap: float):
    return softcap * jnp.tanh(s / softcap) if softcap else s


def _gather_kv(x, idx):
    return jax.vmap(lambda x, i: x[:, i])(x, idx)  # [B,KV,T,D] x [B,T,S] -> [B,KV,T,S,D]


def _sink_part(q, k, v, pos, cfg: _Cfg):
    """-> (out_s [B,H,T,D] f32, lse_s [B,H,T] f32; -inf where a query has no sink key)."""
    s, idx = _sink_scores(q, k, pos, cfg)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse)[..., None])
    b, h, t, _ = s.shape
    p5 = p.reshape(b, cfg.kv_heads, h // cfg.kv_heads, t, cfg.sinks)
    out = jnp.einsum("bkgts,bktsd->bkgtd", p5, _gather_kv(v, idx).astype(F32))
    return out.reshape(b, h, t, -1), lse


def _merge(out_w, lse_w, out_s, lse_s):
    lse = jnp.logaddexp(lse_w, lse_s)
    out = (jnp.exp(lse_w - lse)[..., None] * out_w.astype(F32)
           + jnp.exp(lse_s - lse)[..., None] * out_s)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q, k, v, doc, pos):
    return _attend_fwd(cfg, q, k, v, doc, pos)[0]


def _attend_fwd(cfg, q, k, v, doc, pos):
    out, lse = _splash_fwd_batched(cfg, q, _kv_heads_view(k, cfg), _kv_heads_view(v, cfg), doc)
    if cfg.sinks:
        out_s, lse_s = _sink_part(q, k, v, pos, cfg)
        out, lse = _merge(out, lse, out_s, lse_s)
        out = out.astype(q.dtype)
    return (out, lse), (q, k, v, doc, pos, out, lse)


def _attend_bwd(cfg, res, cts):
    q, k, v, doc, pos, out, lse = res
    do = cts[0].astype(q.dtype)  # lse is a diagnostic: its cotangent is ignored
    dq, dk, dv = _splash_bwd_batched(cfg, q, _kv_heads_view(k, cfg), _kv_heads_view(v, cfg),
                                     doc, out, lse, do)
    if cfg.kv_heads == 1:
        dk, dv = dk[:, None], dv[:, None]
    if cfg.sinks:
        # Gradients of the sink keys' share, with P = exp(s - lse) under the global lse
        # and delta = rowsum(dO * O): d/ds of sum(dO . P v) - delta * sum(P) is
        # P * (dO . v - delta), exactly the flash backward's dS on these keys.
        delta = jnp.einsum("bhtd,bhtd->bht", out.astype(F32), do.astype(F32))

        def surrogate(q, k, v):
            s, idx = _sink_scores(q, k, pos, cfg)
            p = jnp.exp(s - lse[..., None])
            b, h, t, _ = s.shape
            p5 = p.reshape(b, cfg.kv_heads, h // cfg.kv_heads, t, cfg.sinks)
            pv = jnp.einsum("bkgts,bktsd->bkgtd", p5, _gather_kv(v, idx).astype(F32))
            return (jnp.sum(pv.reshape(b, h, t, -1) * do.astype(F32))
                    - jnp.sum(delta * jnp.sum(p, axis=-1)))

        gq, gk, gv = jax.grad(surrogate, argnums=(0, 1, 2))(q, k, v)
        dq = (dq.astype(F32) + gq).astype(q.dtype)
        dk = (dk.astype(F32) + gk).astype(k.dtype)
        dv = (dv.astype(F32) + gv).astype(v.dtype)
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def logit_row_max(q, k, doc, *, causal: bool, window: int, sinks: int, block: int,
                  pos=None, softcap: float = 0.0):
    """Exact max of the visible (scaled) logits per query row, in XLA, blockwise.

    q [B,H,T,D] (already scaled), k [B,KV,T,D], T a multiple of `block`; doc [B,T] (or
    None). Scans only the (query block, key block) pairs the causal / window mask can
    reach, so the work is one causal QK^T (plus the diagonal blocks) and the memory one
    [B, H, block, block] tile; sink keys outside the window are added densely. With a
    soft cap, the maxima of the capped logits (as `attention_reference`).
    -> [B,H,T] f32 (-inf for a row with nothing visible)."""
    b, h, t, d = q.shape
    kv, n = k.shape[1], t // block
    g = h // kv
    pairs = [(i, j) for i in range(n) for j in range(n)
             if (not causal or j <= i)
             and (not window or (j + 1) * block - 1 > i * block - window)]
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    q5 = q.reshape(b, kv, g, t, d)
    iota = jnp.arange(block, dtype=jnp.int32)

    def step(row_max, ij):
        i, j = ij[0], ij[1]
        qi = lax.dynamic_slice_in_dim(q5, i * block, block, axis=3)
        kj = lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
        s = _cap(jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=F32),
                 softcap)
        qpos, kpos = i * block + iota[:, None], j * block + iota[None, :]
        vis = jnp.ones((block, block), bool)
        if causal:
            vis &= kpos <= qpos
        if window:
            vis &= qpos - kpos < window
        vis = jnp.broadcast_to(vis, (b, block, block))
        if doc is not None:
            dq = lax.dynamic_slice_in_dim(doc, i * block, block, axis=1)
            dk = lax.dynamic_slice_in_dim(doc, j * block, block, axis=1)
            vis &= dq[:, :, None] == dk[:, None, :]
        s = jnp.where(vis[:, None, None], s, -jnp.inf)
        blk_max = jnp.max(s, axis=-1).reshape(b, h, block)
        cur = lax.dynamic_slice_in_dim(row_max, i * block, block, axis=2)
        return lax.dynamic_update_slice_in_dim(row_max, jnp.maximum(cur, blk_max),
                                               i * block, axis=2), None

    row_max, _ = lax.scan(step, jnp.full((b, h, t), -jnp.inf, F32), jnp.asarray(pairs))
    if sinks and window:
        cfg = _Cfg(t, h, kv, causal, window, sinks, block, doc is not None, False, softcap)
        s, _ = _sink_scores(q, k, pos, cfg)
        row_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
    return row_max


def splash_attention(q, k, v, *, segment_ids=None, causal=True, window=0, sinks=0,
                     scale=None, softcap=0.0, device_kind=None, block=None,
                     interpret=False, row_max=True):
    """Splash attention with the semantics of `attention_reference`.

    q [B,T,H,D]; k, v [B,T,KV,D] -> (out [B,T,H,D] q.dtype, lse [B,H,T] f32,
    row_max [B,H,T] f32 or None with row_max=False). Differentiable w.r.t. q, k, v.
    `device_kind` picks the block size (`BLOCKS`), `block` overrides it (a multiple of
    128). interpret: pltpu.InterpretParams() runs the Mosaic kernels in Pallas's TPU
    interpreter on CPU (TPU semantics: VMEM, DMAs, grid order), True in the generic one.
    """
    check_shapes(q, k, v)
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block = block or block_for(device_kind, t)
    if block % LANES:
        raise ValueError(f"splash block must be a multiple of {LANES}, got {block}")
    tp = -(-t // block) * block
    sinks = sinks if window else 0

    doc = pos = None
    if segment_ids is not None or tp != t or sinks:
        doc, pos = document_layout(segment_ids, b, t)
        doc = jnp.pad(doc, ((0, 0), (0, tp - t)))  # document 0 = padding
        # Padding is one document of its own: its positions restart at 0.
        pos = jnp.concatenate([pos, jnp.broadcast_to(jnp.arange(tp - t, dtype=jnp.int32),
                                                     (b, tp - t))], axis=1)

    def heads_major(x):  # [B,T,N,D] -> [B,N,Tp,D]
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q_ = heads_major((q.astype(F32) * scale).astype(q.dtype))
    k_, v_ = heads_major(k.astype(q.dtype)), heads_major(v.astype(q.dtype))
    cfg = _Cfg(tp, h, kv, bool(causal), int(window), int(sinks), block, doc is not None,
               interpret, float(softcap))
    out, lse = _attend(cfg, q_, k_, v_, doc, pos)
    out = out[:, :, :t].transpose(0, 2, 1, 3)
    lse = lax.stop_gradient(lse[:, :, :t])
    rmax = None
    if row_max:
        rmax = logit_row_max(lax.stop_gradient(q_), lax.stop_gradient(k_), doc,
                             causal=bool(causal), window=int(window), sinks=int(sinks),
                             block=block, pos=pos, softcap=float(softcap))[:, :, :t]
    return out, lse, rmax
