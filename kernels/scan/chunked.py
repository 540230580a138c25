"""Chunked linear-recurrence scan (the SSD / retention / linear-attention form).

The sequence is cut into chunks of C tokens. Inside a chunk the recurrence is evaluated
in its parallel (attention-like) form, a [C, C] decay-masked score matrix; between
chunks only the [Dk, Dv] state is carried. Work is O(T C (Dk + Dv) + T Dk Dv) per head
and the sequential depth is T / C, which is why this beats a token-by-token scan (depth
T) and an associative scan (materialises T states) on accelerators.

Two implementations share the per-chunk math (`_chunk`):
- `pallas`: one Pallas program per (batch row, head) loops over the chunks with the
  state in registers/VMEM; the backward pass reuses the same forward kernel three times
  (see `differentiable_scan`), so there is one kernel to get right.
- `xla`: the same chunk step under `lax.scan`, differentiated by JAX; the CPU default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lm.kernels.dispatch import GPU_COMPILER_PARAMS, interpret_default, resolve, target_platform
from lm.kernels.scan.reference import reset_flags

F32 = jnp.float32


def _chunk(s_KV, q_CK, k_CK, v_CV, a_cum_C, resets_cum_C):
    """One chunk. `a_cum_C`: inclusive cumulative log decay within the chunk;
    `resets_cum_C`: inclusive count of document starts within the chunk (two tokens are
    in the same document iff their counts are equal; a token sees the carried state iff
    its count is 0). Returns (o_CV in float32, the state after the chunk)."""
    c = q_CK.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    same_doc = (row >= col) & (resets_cum_C[:, None] == resets_cum_C[None, :])
    # where() inside exp(): masked entries may hold exp(+large) otherwise.
    decay_CC = jnp.exp(jnp.where(same_doc, a_cum_C[:, None] - a_cum_C[None, :], -jnp.inf))
    scores_CC = jnp.dot(q_CK, k_CK.T, preferred_element_type=F32) * decay_CC
    o_CV = jnp.dot(scores_CC.astype(v_CV.dtype), v_CV, preferred_element_type=F32)
    from_state_C = jnp.exp(jnp.where(resets_cum_C == 0, a_cum_C, -jnp.inf))
    o_CV += jnp.dot(q_CK.astype(F32) * from_state_C[:, None], s_KV, preferred_element_type=F32)

    # The last entries via masked reductions (no scalar indexing inside a kernel).
    is_last = jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
    a_last = jnp.sum(jnp.where(is_last, a_cum_C, 0.0))
    resets_last = jnp.max(resets_cum_C)
    carry = jnp.exp(jnp.where(resets_last == 0, a_last, -jnp.inf))
    to_end_C = jnp.exp(jnp.where(resets_cum_C == resets_last, a_last - a_cum_C, -jnp.inf))
    s_KV = carry * s_KV + jax.lax.dot_general(
        k_CK.astype(F32) * to_end_C[:, None], v_CV.astype(F32), (((0,), (0,)), ((), ())),
        preferred_element_type=F32)
    return o_CV, s_KV


def _cumulate(a_BHT, resets_BT, chunk: int):
    """Within-chunk inclusive cumulative sums of the log decay and of the reset flags."""
    b, h, t = a_BHT.shape
    a_cum = jnp.cumsum(a_BHT.reshape(b, h, t // chunk, chunk), axis=-1).reshape(b, h, t)
    r_cum = jnp.cumsum(resets_BT.astype(jnp.int32).reshape(b, t // chunk, chunk), axis=-1)
    return a_cum, r_cum.reshape(b, t)


# ------------------------------------------------------------------------------ pallas

def _kernel(q_ref, k_ref, v_ref, a_ref, r_ref, s0_ref, o_ref, s_ref, *, chunk, n_chunks):
    def body(i, s_KV):
        span = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        o_CV, s_KV = _chunk(s_KV, q_ref[span, :], k_ref[span, :], v_ref[span, :],
                            a_ref[span], r_ref[span])
        o_ref[span, :] = o_CV.astype(o_ref.dtype)
        return s_KV

    s_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))


def _scan_call(q, k, v, a_cum_BHT, r_cum_BT, s0, *, chunk, interpret, out_dtype=None):
    """The forward kernel on chunk-aligned inputs: q, k [B, T, G, Dk], v [B, T, H, Dv],
    s0 [B, H, Dk, Dv] float32 -> (o [B, T, H, Dv], final state float32)."""
    b, t, g, dk = q.shape
    h, dv = v.shape[2], v.shape[3]
    rep = h // g
    kernel = functools.partial(_kernel, chunk=chunk, n_chunks=t // chunk)
    return pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[
            pl.BlockSpec((None, t, None, dk), lambda i, j: (i, 0, j // rep, 0)),
            pl.BlockSpec((None, t, None, dk), lambda i, j: (i, 0, j // rep, 0)),
            pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0)),
            pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, t), lambda i, j: (i, 0)),
            pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0)),
            pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, dv), out_dtype or v.dtype),
                   jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        interpret=interpret,
        compiler_params=GPU_COMPILER_PARAMS,
        name="chunked_linear_scan",
    )(q, k, v, a_cum_BHT, r_cum_BT, s0)


def differentiable_scan(scan_call):
    """The scan as a custom_vjp function `(q, k, v, a_BHT, resets_BT, s0, chunk,
    interpret) -> (o, final state)` from one forward kernel `scan_call(q, k, v, a_cum,
    r_cum, s0, *, chunk, interpret, out_dtype=None)`: the backward runs the same kernel
    three times (backward_from_forward). Built once per kernel: here (Triton style) and
    in tpu.py (Mosaic TPU)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def scan(q, k, v, a_BHT, resets_BT, s0, chunk, interpret):
        a_cum, r_cum = _cumulate(a_BHT, resets_BT, chunk)
        return scan_call(q, k, v, a_cum, r_cum, s0, chunk=chunk, interpret=interpret)

    def fwd(q, k, v, a_BHT, resets_BT, s0, chunk, interpret):
        o, s_final = scan(q, k, v, a_BHT, resets_BT, s0, chunk, interpret)
        return (o, s_final), (q, k, v, a_BHT, resets_BT, s0, s_final)

    def bwd(chunk, interpret, residuals, cotangents):
        call = functools.partial(scan_call, chunk=chunk, interpret=interpret, out_dtype=F32)
        return backward_from_forward(call, chunk, residuals, cotangents)

    scan.defvjp(fwd, bwd)
    return scan


def backward_from_forward(call, chunk, residuals, cotangents):
    """The scan's VJP from three runs of a forward kernel `call(q, k, v, a_cum, r_cum, s0)`
    (layouts as `_scan_call`'s, outputs in float32); shared with the TPU kernel (tpu.py).

    Every gradient is again a linear recurrence of the same shape:
    - dq_t = do_t S_t^T: the forward scan with (q, k, v) -> (do, v, k), state S^T;
    - G_t = dL/dS_t runs backwards in time: G_t = q_t^T do_t + exp(a_{t+1}) G_{t+1},
      with G_{T-1} seeded by the final state's cotangent. On the time-reversed sequence
      (decays shifted by one step) that is the forward scan again, and
      dv_t = k_t G_t, dk_t = v_t G_t^T, d(initial state) = exp(a_0) G_0;
    - with A the cumulative log decay, dL/dA_t = q_t.dq_t - k_t.dk_t (plus <dS, S> for
      the final state at T-1), and da_t is the suffix sum of dL/dA.
    """
    q, k, v, a_BHT, resets_BT, s0, s_final = residuals
    do, ds_final = cotangents
    b, t, g, dk = q.shape
    h = v.shape[2]
    rep = h // g
    q_h, k_h = jnp.repeat(q, rep, axis=2), jnp.repeat(k, rep, axis=2)
    a_cum, r_cum = _cumulate(a_BHT, resets_BT, chunk)
    dq_h, _ = call(do, v, k_h, a_cum, r_cum, jnp.swapaxes(s0, -1, -2))

    flip = functools.partial(jnp.flip, axis=1)
    a_rev = jnp.flip(jnp.concatenate([a_BHT[..., 1:], jnp.zeros_like(a_BHT[..., :1])], -1), -1)
    r_rev = flip(jnp.concatenate([resets_BT[:, 1:], jnp.zeros_like(resets_BT[:, :1])], 1))
    a_cum_rev, r_cum_rev = _cumulate(a_rev, r_rev, chunk)
    ds_final = ds_final.astype(F32)
    dv, g0 = call(flip(k), flip(q), flip(do), a_cum_rev, r_cum_rev, ds_final)
    dk_h, _ = call(flip(v), flip(do), flip(q_h), a_cum_rev, r_cum_rev,
                   jnp.swapaxes(ds_final, -1, -2))
    dv, dk_h = flip(dv), flip(dk_h)

    dA = (jnp.einsum("bthk,bthk->bht", q_h.astype(F32), dq_h)
          - jnp.einsum("bthk,bthk->bht", k_h.astype(F32), dk_h))
    dA = dA.at[..., -1].add(jnp.sum(ds_final * s_final, axis=(-2, -1)))
    da = jnp.flip(jnp.cumsum(jnp.flip(dA, -1), axis=-1), -1)
    ds0 = jnp.exp(a_BHT[..., 0])[..., None, None] * g0

    def per_group(x_BTHK):
        return x_BTHK.reshape(b, t, g, rep, -1).sum(3)

    return (per_group(dq_h).astype(q.dtype), per_group(dk_h).astype(k.dtype),
            dv.astype(v.dtype), da.astype(a_BHT.dtype), None, ds0.astype(s0.dtype))


_pallas_scan = differentiable_scan(_scan_call)


# --------------------------------------------------------------------------------- xla

def _xla_scan(q, k, v, a_BHT, resets_BT, s0, chunk):
    """The chunk step under lax.scan, vmapped over batch and heads."""
    b, t, g, dk = q.shape
    h, dv = v.shape[2], v.shape[3]
    n = t // chunk
    a_cum, r_cum = _cumulate(a_BHT, resets_BT, chunk)

    def per_head(x_BTHX):  # [B, T, H, X] -> [B, H, n, C, X]
        return jnp.moveaxis(x_BTHX, 2, 1).reshape(b, x_BTHX.shape[2], n, chunk, -1)

    q_c = jnp.repeat(per_head(q), h // g, axis=1)
    k_c = jnp.repeat(per_head(k), h // g, axis=1)
    v_c = per_head(v)
    a_c = a_cum.reshape(b, h, n, chunk)
    r_c = jnp.broadcast_to(r_cum.reshape(b, 1, n, chunk), (b, h, n, chunk))

    def one_head(s_KV, q_n, k_n, v_n, a_n, r_n):
        def step(s, xs):
            o, s = _chunk(s, *xs)
            return s, o
        return jax.lax.scan(step, s_KV, (q_n, k_n, v_n, a_n, r_n))

    s_final, o = jax.vmap(jax.vmap(one_head))(s0.astype(F32), q_c, k_c, v_c, a_c, r_c)
    o_BTHV = jnp.moveaxis(o.reshape(b, h, t, dv), 1, 2)
    return o_BTHV.astype(v.dtype), s_final


# ---------------------------------------------------------------------------- public

# Where linear_scan has a Pallas kernel: the Triton-style kernel above on GPU (and in
# generic interpret mode on CPU), the Mosaic kernel of tpu.py on TPU.
PALLAS_ON = ("gpu", "cpu", "tpu")


def scan_impl(impl: str) -> str:
    """'pallas' or 'xla': what linear_scan(impl=...) runs on the target platform."""
    return resolve("linear_scan", impl, pallas_on=PALLAS_ON)


def pltpu_interpret():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()


def linear_scan(q, k, v, log_decay, *, segment_ids=None, initial_state=None,
                chunk_size: int = 64, impl: str = "auto", interpret=None):
    """S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t;  o_t = q_t S_t  (see reference.py).

    q, k: [B, T, G, Dk] (G divides H: a group of heads shares q and k); v: [B, T, H, Dv];
    log_decay: [B, T, H] (<= 0 for a decaying state); segment_ids: [B, T] or None;
    initial_state: [B, H, Dk, Dv] or None. Returns (o [B, T, H, Dv] in v's dtype,
    final state [B, H, Dk, Dv] float32). T need not be a multiple of chunk_size.
    impl: "pallas" | "xla" | "auto" (see kernels/dispatch.py: pallas on GPU and TPU; on
    TPU the Mosaic kernel of tpu.py, whose chunk is rounded up to a multiple of 16).
    interpret: for the Triton-style kernel, generic interpret mode (default: on a CPU
    target); on a TPU target, True (or a pltpu.InterpretParams) runs the TPU kernel in
    TPU interpret mode.
    """
    b, t, h, dv = v.shape
    g, dk = q.shape[2], q.shape[3]
    if k.shape != q.shape or q.shape[:2] != (b, t) or h % g:
        raise ValueError(f"linear_scan: q {q.shape} and k {k.shape} must be [B, T, G, Dk] "
                         f"with G dividing the heads of v {v.shape}")
    if log_decay.shape != (b, t, h):
        raise ValueError(f"linear_scan: log_decay {log_decay.shape} must be {(b, t, h)}")
    impl = scan_impl(impl)
    on_tpu = impl == "pallas" and target_platform() == "tpu"
    chunk = min(chunk_size, t)
    if on_tpu:
        from lm.kernels.scan import tpu  # Mosaic TPU kernel (tpu.py)
        chunk = tpu.legal_chunk(chunk)  # TPU tiles: rows in multiples of 16
    pad = -t % chunk
    resets = reset_flags(segment_ids, t, b)
    a_BHT = jnp.moveaxis(log_decay.astype(F32), 1, 2)
    if pad:
        # Padding tokens (q = k = v = 0, no decay, no reset) leave the state unchanged.
        def padded(x):
            return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, resets = padded(q), padded(k), padded(v), padded(resets)
        a_BHT = jnp.pad(a_BHT, [(0, 0), (0, 0), (0, pad)])
    s0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None
          else initial_state.astype(F32))
    if on_tpu:
        # interpret=True here means TPU interpret mode (TPU semantics on CPU, for tests);
        # a pltpu.InterpretParams is passed on as it is.
        interp = pltpu_interpret() if interpret is True else (interpret or False)
        o, s_final = tpu.tpu_scan(q, k, v, a_BHT, resets, s0, chunk, interp)
    elif impl == "pallas":
        if interpret is None:
            interpret = interpret_default()
        o, s_final = _pallas_scan(q, k, v, a_BHT, resets, s0, chunk, interpret)
    else:
        o, s_final = _xla_scan(q, k, v, a_BHT, resets, s0, chunk)
    return o[:, :t], s_final
