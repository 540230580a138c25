"""The chunked linear-recurrence scan as a Mosaic TPU Pallas kernel.

Same math as chunked.py (`_chunk`), arranged for the TPU:
- grid (batch, head, block of tokens): batch and head are "parallel" (megacore chips
  split them between their cores), the block axis is "arbitrary" (sequential), and the
  [Dk, Dv] float32 state lives in a VMEM scratch buffer that persists across the blocks
  of one (batch, head). A grid step takes a block of about BLOCK_TOKENS tokens (a whole
  number of chunks, see `block_chunks`) and loops over its chunks; Pallas
  double-buffers the next block's DMA behind this block's matmuls, and VMEM holds two
  blocks, not the whole sequence (as the GPU kernel's per-program sequence does).
- TPU tiling: the last two dims of every block are multiples of (8, 128) or the full
  array dims. A (C, D) tile is legal when C is a multiple of 16 (bf16 packs 16 rows per
  tile; linear_scan rounds the chunk up, see `legal_chunk`) and D is the whole last dim.
  So no head dim is padded in HBM: q, k, v, o go in as [B, T, X*D] (a free reshape)
  when D is a multiple of 128 or there is one head/group, else transposed to
  [B, X, T, D] (one extra HBM pass each way, done by XLA). Mosaic pads a D < 128 to 128
  lanes inside VMEM/vregs: D = 64 uses half of each vreg and of the MXU's width, which
  is a throughput cost only.
- per-token scalars (the chunk's cumulative log decay and document-start count) are
  passed as rows of chunks ([.., T / C, C]: C lanes a row in HBM), and turned into the
  columns the kernel also needs inside it (see `_chunk_step`).
- the backward pass is the forward kernel three times (chunked.backward_from_forward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lm.kernels.scan.chunked import differentiable_scan

F32 = jnp.float32
SUBLANES = 16  # rows of a bf16 (16, 128) tile; a multiple of f32's 8 too
NT = (((1,), (1,)), ((), ()))  # contract the last dims: x @ y.T


def legal_chunk(chunk: int) -> int:
    """The chunk rounded up to a multiple of 16 rows (a TPU tile of bf16, two of f32).
    Costs at most 15 padded rows per chunk, computed and thrown away."""
    return -(-chunk // SUBLANES) * SUBLANES


def _chunk_step(s_KV, q_CK, k_CK, v_CV, a_1C, r_1C):
    """chunked._chunk with the per-token scalars as rows (1, C): a = inclusive cumulative
    log decay in the chunk, r = inclusive count of document starts (same document iff
    equal; a token sees the carried state iff 0)."""
    c = q_CK.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    # The same scalars as columns (C, 1), to scale rows of q and k: the diagonal of the
    # broadcast row, summed along lanes (a (C, C) select and a lane reduction, cheap
    # beside the chunk's matmuls). Passing columns in instead would cost HBM: an
    # [.., T, 1] f32 array is tiled (8, 128) there, 128 times its size.
    diag = row == col
    a_C1 = jnp.sum(jnp.where(diag, a_1C, 0.0), axis=1, keepdims=True)
    r_C1 = jnp.sum(jnp.where(diag, r_1C, 0.0), axis=1, keepdims=True)
    same_doc = (row >= col) & (r_C1 == r_1C)
    # where() inside exp(): a masked entry may be exp(+large) otherwise.
    decay_CC = jnp.exp(jnp.where(same_doc, a_C1 - a_1C, -jnp.inf))
    scores_CC = jax.lax.dot_general(q_CK, k_CK, NT, preferred_element_type=F32) * decay_CC
    o_CV = jnp.dot(scores_CC.astype(v_CV.dtype), v_CV, preferred_element_type=F32)
    from_state_C1 = jnp.exp(jnp.where(r_C1 == 0, a_C1, -jnp.inf))
    o_CV += jnp.dot(q_CK.astype(F32) * from_state_C1, s_KV, preferred_element_type=F32)

    # The chunk's last entries by lane reductions ((1, 1) arrays: no scalar extraction).
    is_last = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1) == c - 1
    a_last = jnp.sum(jnp.where(is_last, a_1C, 0.0), axis=1, keepdims=True)
    r_last = jnp.max(r_1C, axis=1, keepdims=True)
    carry = jnp.exp(jnp.where(r_last == 0, a_last, -jnp.inf))
    to_end_C1 = jnp.exp(jnp.where(r_C1 == r_last, a_last - a_C1, -jnp.inf))
    kw_CK = k_CK.astype(F32) * to_end_C1
    s_KV = carry * s_KV + jnp.dot(kw_CK.T, v_CV.astype(F32), preferred_element_type=F32)
    return o_CV, s_KV


def _kernel(q_ref, k_ref, v_ref, a_ref, r_ref, s0_ref, o_ref, sT_ref, s_scr, *, chunk,
            n_sub):
    """One grid step: a block of n_sub chunks of one (batch row, head); q/k/v/o refs
    hold (n_sub * C, D) tiles, a and r (n_sub, C): chunk j's scalars are row j."""
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s_scr[...] = s0_ref[...]

    def body(j, _):
        span = pl.ds(pl.multiple_of(j * chunk, chunk), chunk)
        # The state goes through VMEM scratch, not the loop carry: 16 vregs at 128 x 128
        # f32 would crowd the register file the chunk's [C, C] scores need.
        o_CV, s_KV = _chunk_step(s_scr[...], q_ref[span, :], k_ref[span, :],
                                 v_ref[span, :], a_ref[pl.ds(j, 1), :],
                                 r_ref[pl.ds(j, 1), :])
        s_scr[...] = s_KV
        o_ref[span, :] = o_CV.astype(o_ref.dtype)
        return 0

    jax.lax.fori_loop(0, n_sub, body, 0)

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = s_scr[...]


def block_chunks(n_chunks: int, chunk: int) -> int:
    """Chunks per grid step. A grid step costs ~0.35 us of pipeline overhead on TPU while
    one 64-token chunk's matmuls take nanoseconds, so a step takes about BLOCK_TOKENS
    tokens. The per-token scalars reach the kernel as (chunks, C) blocks, whose row
    count must be a multiple of 8 or all the chunks: so all of them when they fit
    (or there are at most 8), else the largest multiple of 8 within BLOCK_TOKENS (at
    least 8) that divides the chunk count, else that multiple with the sequence padded
    up to a whole number of blocks (at most n_sub - 1 chunks of zeros, computed)."""
    limit = max(8, BLOCK_TOKENS // chunk // 8 * 8)
    if n_chunks <= limit:
        return n_chunks
    return next((d for d in range(limit, 0, -8) if n_chunks % d == 0), limit)


# Tokens per grid step (at least 8 chunks). VMEM per step at 512 tokens, D = 128, bf16:
# q, k, v, o tiles of 128 KiB each, double-buffered (1 MiB), plus the [Dk, Dv] state:
# far below any TPU's scoped VMEM (16-32 MiB), and long enough to amortise the step.
BLOCK_TOKENS = 512


def _tiles(shape_BTXD, chunk: int):
    """How an array [B, T, X, D] reaches the kernel as (C, D) tiles at grid point
    (b, x, i): (to the kernel's layout, its BlockSpec, back to [B, T, X, D])."""
    b, t, n_x, d = shape_BTXD
    if d % 128 == 0 or n_x == 1:  # [B, T, X*D]: a (C, D) block is legal, no copy
        spec = pl.BlockSpec((None, chunk, d), lambda bi, xi, ci: (bi, ci, xi))
        return (lambda x: x.reshape(b, t, n_x * d)), spec, lambda y: y.reshape(b, t, n_x, d)
    spec = pl.BlockSpec((None, None, chunk, d), lambda bi, xi, ci: (bi, xi, ci, 0))
    return (lambda x: jnp.swapaxes(x, 1, 2)), spec, lambda y: jnp.swapaxes(y, 1, 2)


def _scan_call(q, k, v, a_cum_BHT, r_cum_BT, s0, *, chunk, interpret, out_dtype=None):
    """The forward kernel on chunk-aligned inputs, the signature of chunked._scan_call:
    q, k [B, T, G, Dk], v [B, T, H, Dv], s0 [B, H, Dk, Dv] float32 -> (o [B, T, H, Dv],
    final state float32)."""
    b, t, g, dk = q.shape
    h, dv = v.shape[2], v.shape[3]
    rep = h // g
    n_sub = block_chunks(t // chunk, chunk)
    block = n_sub * chunk  # tokens per grid step
    pad = -t % block
    if pad:  # whole chunks of zeros: no input, no decay, no reset (the state passes)
        def padded(x, axis):
            return jnp.pad(x, [(0, pad) if d == axis else (0, 0) for d in range(x.ndim)])
        q, k, v = padded(q, 1), padded(k, 1), padded(v, 1)
        a_cum_BHT, r_cum_BT = padded(a_cum_BHT, 2), padded(r_cum_BT, 1)
    tp = t + pad
    n = tp // block  # grid steps along the sequence
    out_dtype = out_dtype or v.dtype

    def by_group(spec):  # head j reads q/k group j // rep
        # lax.div (truncating; equal for j >= 0), not //: jnp's floor division emits a
        # sign op whose Mosaic lowering asks for the TPU generation, which an AOT
        # compile from a CPU host only has under an abstract mesh.
        return pl.BlockSpec(spec.block_shape,
                            lambda bi, hi, ci: spec.index_map(bi, jax.lax.div(hi, rep), ci))

    qk_in, qk_spec, _ = _tiles(q.shape, block)
    v_in, v_spec, v_back = _tiles(v.shape, block)
    q_in, k_in, v_in = qk_in(q), qk_in(k), v_in(v)  # o takes v's layout, out_dtype
    a = a_cum_BHT.astype(F32)
    r = r_cum_BT.astype(F32)  # small integer counts, exact in f32; compared with ==
    # Per-token scalars as rows of chunks: [B, H, T / C, C] and [B, T / C, C].
    a = a_cum_BHT.astype(F32).reshape(b, h, tp // chunk, chunk)
    r = r_cum_BT.astype(F32).reshape(b, tp // chunk, chunk)  # small counts: exact in f32
    per_token = [
        (a, pl.BlockSpec((None, None, n_sub, chunk), lambda bi, hi, ci: (bi, hi, ci, 0))),
        (r, pl.BlockSpec((None, n_sub, chunk), lambda bi, hi, ci: (bi, ci, 0)))]
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, ci: (bi, hi, 0, 0))
    o, s_final = pl.pallas_call(
        functools.partial(_kernel, chunk=chunk, n_sub=n_sub),
        grid=(b, h, n),
        in_specs=[by_group(qk_spec), by_group(qk_spec), v_spec,
                  *(s for _, s in per_token), state_spec],
        out_specs=[v_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(v_in.shape, out_dtype),
                   jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="chunked_linear_scan_tpu",
    )(q_in, k_in, v_in, *(x for x, _ in per_token), s0.astype(F32))
    return v_back(o)[:, :t], s_final


# linear_scan's pallas path on TPU: (q, k, v, a_BHT, resets_BT, s0, chunk, interpret) on
# inputs already padded to a multiple of `chunk` (a multiple of 16). `interpret`: False,
# or pltpu.InterpretParams() to run the kernel on CPU with TPU semantics (tests).
tpu_scan = differentiable_scan(_scan_call)
