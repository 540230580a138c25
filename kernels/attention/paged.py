"""Attention over the batched engine's K/V page pool: decode and packed prefill.

One call attends a ragged batch of query tokens to their sequences' pages, with the
semantics of JAX's TPU kernel `ragged_paged_attention`
(jax.experimental.pallas.ops.tpu.ragged_paged_attention) and its
`ref_ragged_paged_attention`:

    q_NHD            [N, H, Dh]     the query tokens of every sequence, concatenated
    kv_pages         [P, page_size, 2*KV, Dh]  the pool; combined head 2j is key head j,
                                    2j + 1 value head j (k0 v0 k1 v1 ...)
    kv_lens_S        i32[S]         keys of sequence i (its tokens so far, new ones included)
    page_indices_SM  i32[S, M]      sequence i's pages in order (position p is slot
                                    p % page_size of page page_indices[i, p // page_size])
    cu_q_lens_S1     i32[S + 1]     sequence i's queries are rows cu_q_lens[i]:cu_q_lens[i+1]
    num_seqs_1       i32[1]         sequences in use (rows i >= num_seqs are ignored)

Sequence i's q_len = cu_q_lens[i+1] - cu_q_lens[i] queries are the LAST q_len positions
of its kv_len keys: query j sits at position kv_len - q_len + j and sees key positions
k <= its own (causal), and with a window W only those with q_pos - k_pos < W (lmlab's
window: `_window` in lm/model/mixers/attention.py; the kernel's `sliding_window` masks
k <= q_pos - W, the same set, so W passes through unchanged). Decode is q_len = 1,
prefill q_len = kv_len (or the tail of a prefix already in the pages). The new tokens'
keys and values must already be in the pages (neither path writes them); q_len <=
kv_len; rows from cu_q_lens[num_seqs] to N are padding and their output is undefined
(zero on the xla path, whatever the kernel left on TPU). The logit soft cap applies to
the scaled logits, as lmlab's.

impl ("auto" | "pallas" | "xla", lm/kernels/dispatch.py `resolve`, by the platform being
compiled for): pallas is the upstream Mosaic kernel on TPU, only there (a request for it
elsewhere is the xla path, logged once); auto is pallas on TPU when `supports(...)` says
the kernel can take the settings (else xla, logged once), xla elsewhere; an explicit
impl="pallas" on TPU with unsupported settings (sink tokens, a kv-head count the kernel
cannot tile, ...) raises ValueError saying why. xla is `paged_attention_xla`: the same
semantics in jnp, vectorised over tokens (jit-able at a fixed N and S), which gathers
each query token's sequence keys ([N, M * page_size, KV, Dh]: what the engine's XLA
decode path gathers today; for long packed prefills it is the memory of a dense score
matrix times Dh).

Block sizes: upstream picks them with `get_tuned_block_sizes`, which reads
jax.devices()[0] and so fails when a TPU program is compiled on a CPU host (`lm
compile`); `block_sizes` does the same lookup in upstream's table for a given
device_kind (the mesh's devices'). The kernel does not run in Pallas's interpret modes in
JAX 0.12 (the TPU interpreter cannot index a reshaped ref, `ReshapeTransform`; the generic
one cannot discharge its strided loads), so on CPU it is only lowered and compiled for a
TPU topology (tests/e2e/test_kernels_paged_tpu.py); its numerics are upstream's, tested
upstream on TPUs.
"""

from __future__ import annotations

import logging
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as rpa_tuned

from lm.kernels.dispatch import resolve, target_platform

F32 = jnp.float32
IMPLS = ("auto", "pallas", "xla")
MASK_VALUE = rpa.DEFAULT_MASK_VALUE  # upstream's (finite: no NaN from an empty row)
KERNEL_NAME = "ragged_paged_attention_kernel"  # the pallas_call's name, found in the HLO
# Bytes of VMEM for the double-buffered K/V block where no tuned entry applies: 4 MiB
# compiles for v5e at 8 kv heads (8 MiB overflowed its default scoped VMEM).
KV_BLOCK_VMEM = 4 * 2**20
log = logging.getLogger("lmlab.kernels")
_LOGGED: set[str] = set()


def combine_kv(k_PSKD: jax.Array, v_PSKD: jax.Array) -> jax.Array:
    """Separate key and value pools [P, page_size, KV, Dh] -> the kernel's combined pool
    [P, page_size, 2*KV, Dh] (keys at even, values at odd combined heads)."""
    p, s, kv, d = k_PSKD.shape
    return jnp.stack([k_PSKD, v_PSKD.astype(k_PSKD.dtype)], axis=3).reshape(p, s, 2 * kv, d)


def split_kv(kv_pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The combined pool -> (keys, values), each [P, page_size, KV, Dh]."""
    return kv_pages[:, :, 0::2], kv_pages[:, :, 1::2]


# ------------------------------------------------------------------- what the kernel takes

def unsupported(*, head_dim: int, heads: int, kv_heads: int, dtype, kv_dtype=None,
                window: int = 0, sinks: int = 0, softcap: float = 0.0) -> str:
    """Why the TPU kernel cannot run these settings ("" when it can)."""
    kv_dtype = jnp.dtype(kv_dtype if kv_dtype is not None else dtype)
    dtype = jnp.dtype(dtype)
    if sinks:
        return (f"sink tokens (model.attention.sinks={sinks}): the kernel's mask is causal "
                "+ sliding window only")
    if window < 0 or softcap < 0:
        return f"window ({window}) and softcap ({softcap}) must be >= 0"
    if dtype != kv_dtype:
        return f"queries ({dtype.name}) and pages ({kv_dtype.name}) must share a dtype"
    if dtype.name not in ("float32", "bfloat16"):
        return f"dtype {dtype.name}: float32 or bfloat16 only"
    if heads % kv_heads:
        return f"{heads} query heads do not divide into {kv_heads} kv heads"
    if head_dim != 128:
        # Its m/l scratch is 128 lanes wide and broadcast over the head dim (64, 192: an
        # assertion in the kernel); 256 fails in Mosaic ("last dim size is not 128"),
        # compiled for v5e with JAX 0.12.
        return f"head_dim {head_dim}: the kernel takes 128 only"
    try:
        rpa.get_min_heads_per_blk(heads, 2 * kv_heads, dtype, kv_dtype)
    except ValueError as e:  # combined kv heads that Mosaic cannot tile
        return f"{kv_heads} kv heads in {kv_dtype.name}: {e}"
    return ""


def supports(*, head_dim: int, heads: int, kv_heads: int, dtype, kv_dtype=None,
             window: int = 0, sinks: int = 0, softcap: float = 0.0) -> bool:
    """Whether impl="pallas" (the TPU kernel) can take these settings."""
    return not unsupported(head_dim=head_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
                           kv_dtype=kv_dtype, window=window, sinks=sinks, softcap=softcap)


def tpu_generation(device_kind: str | None) -> int:
    """4, 5, 6, 7 from a device_kind ('TPU v5 lite', 'TPU v6e', 'TPU7x'); -1 if none."""
    if not device_kind or "TPU" not in device_kind:
        return -1
    m = re.search(r"TPU\s*v?(\d+)", device_kind, re.IGNORECASE)
    return int(m.group(1)) if m else -1


def block_sizes(device_kind: str | None, q_dtype, kv_dtype, heads: int, kv_heads: int,
                head_dim: int, page_size: int, tokens: int, pages_per_seq: int
                ) -> tuple[int, int]:
    """(kv pages per block, queries per block) for the TPU generation named by
    `device_kind` (upstream's `get_tuned_block_sizes` reads jax.devices()[0] instead):
      1. upstream's tuned entry for these shapes ('TPU v5' / 'TPU v6' tables, keys
         rounded as upstream rounds them);
      2. else the tuned entry of the same heads, head dim and page size nearest in
         tokens and max sequence length (the table covers 512-4096 tokens: a decode
         step of 32 slots misses it, and upstream's fallback of 128 pages per block
         overflows the default scoped VMEM at 8 kv heads, checked by compiling for v5e);
      3. else upstream's default (128, 32) ((32, 32) on v4) with the pages per block
         halved until the double-buffered K/V block is at most KV_BLOCK_VMEM bytes.
    Clipped to the pages per sequence and the tokens."""
    q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
    q_blk_heads, kv_blk_heads = rpa.get_min_heads_per_blk(heads, 2 * kv_heads, q_dtype, kv_dtype)
    key = rpa_tuned.simplify_key((q_dtype, kv_dtype, q_blk_heads, kv_blk_heads // 2, head_dim,
                                  page_size, tokens, pages_per_seq))
    gen = tpu_generation(device_kind)
    table = rpa_tuned.TUNED_BLOCK_SIZES.get(f"TPU v{gen}", {})
    near = [k for k in table if k[:6] == key[:6]]
    if key in table:
        bkv, bq = table[key]
    elif near:
        def distance(k):
            return (abs(math.log2(k[6] / key[6])), abs(math.log2(k[7] / key[7])), k)
        bkv, bq = table[min(near, key=distance)]
    else:
        bkv, bq = (32, 32) if gen == 4 else (128, 32)
        per_page = 2 * page_size * kv_blk_heads * head_dim * kv_dtype.itemsize  # 2 buffers
        while bkv > 1 and bkv * per_page > KV_BLOCK_VMEM:
            bkv //= 2
    return max(1, min(pages_per_seq, bkv)), max(1, min(tokens, bq))


# ------------------------------------------------------------------- the two paths

def paged_attention_xla(q_NHD, kv_pages, kv_lens_S, page_indices_SM, cu_q_lens_S1,
                        num_seqs_1, *, scale: float, window: int = 0,
                        softcap: float = 0.0) -> jax.Array:
    """The kernel's semantics in jnp (see the module docstring), vectorised over the
    query tokens; rows past cu_q_lens[num_seqs] come out as zeros."""
    n, h, d = q_NHD.shape
    _, ps, kv2, _ = kv_pages.shape
    kv = kv2 // 2
    s, m = page_indices_SM.shape
    g = h // kv
    rows = jnp.arange(n, dtype=jnp.int32)
    num = num_seqs_1[0]
    valid_N = rows < cu_q_lens_S1[num]
    # Each token's sequence (the last start <= the row) and its position in it.
    seq_N = jnp.clip(jnp.searchsorted(cu_q_lens_S1[1:], rows, side="right"), 0, s - 1)
    q_len_N = cu_q_lens_S1[seq_N + 1] - cu_q_lens_S1[seq_N]
    kv_len_N = kv_lens_S[seq_N]
    q_pos_N = kv_len_N - q_len_N + rows - cu_q_lens_S1[seq_N]
    # Each token's sequence keys, gathered from the pool: [N, L, 2KV, Dh], L = M * ps.
    flat = kv_pages.reshape(-1, kv2, d)
    slot_L = jnp.arange(m * ps, dtype=jnp.int32)
    idx_NL = page_indices_SM[seq_N][:, slot_L // ps] * ps + slot_L % ps
    in_seq_NL = slot_L[None, :] < kv_len_N[:, None]
    kv_NLCD = jnp.where(in_seq_NL[:, :, None, None], flat[idx_NL], 0)  # pages past kv_len: 0
    k_NLKD, v_NLKD = kv_NLCD[:, :, 0::2], kv_NLCD[:, :, 1::2]
    q_NKGD = q_NHD.reshape(n, kv, g, d)
    s_NKGL = jnp.einsum("nkgd,nlkd->nkgl", q_NKGD, k_NLKD, preferred_element_type=F32) * scale
    visible_NL = slot_L[None, :] <= q_pos_N[:, None]
    if window:
        visible_NL &= q_pos_N[:, None] - slot_L[None, :] < window
    if softcap:
        s_NKGL = softcap * jnp.tanh(s_NKGL / softcap)
    s_NKGL = s_NKGL + jnp.where(visible_NL, 0.0, MASK_VALUE)[:, None, None, :]
    p_NKGL = jax.nn.softmax(s_NKGL, axis=-1).astype(v_NLKD.dtype)
    out_NKGD = jnp.einsum("nkgl,nlkd->nkgd", p_NKGL, v_NLKD).astype(q_NHD.dtype)
    return jnp.where(valid_N[:, None, None], out_NKGD.reshape(n, h, d), 0)


def paged_attention_pallas(q_NHD, kv_pages, kv_lens_S, page_indices_SM, cu_q_lens_S1,
                           num_seqs_1, *, scale: float, window: int = 0, softcap: float = 0.0,
                           device_kind: str | None = None,
                           blocks: tuple[int, int] | None = None) -> jax.Array:
    """The upstream TPU kernel (Mosaic: runs on a TPU or compiles for one), with block
    sizes from `block_sizes(device_kind, ...)` unless `blocks` = (kv pages, queries)."""
    n, h, d = q_NHD.shape
    _, ps, kv2, _ = kv_pages.shape
    why = unsupported(head_dim=d, heads=h, kv_heads=kv2 // 2, dtype=q_NHD.dtype,
                      kv_dtype=kv_pages.dtype, window=window, softcap=softcap)
    if why:
        raise ValueError(f"paged_attention: the TPU kernel does not support {why}; "
                         "use impl='xla'")
    if device_kind is None and jax.default_backend() == "tpu":
        device_kind = jax.devices()[0].device_kind
    bkv, bq = blocks or block_sizes(device_kind, q_NHD.dtype, kv_pages.dtype, h, kv2 // 2, d,
                                    ps, n, page_indices_SM.shape[1])
    return rpa.ragged_paged_attention(
        q_NHD, kv_pages, kv_lens_S.astype(jnp.int32), page_indices_SM.astype(jnp.int32),
        cu_q_lens_S1.astype(jnp.int32), num_seqs_1.astype(jnp.int32), sm_scale=float(scale),
        sliding_window=int(window) or None, soft_cap=float(softcap) or None,
        num_kv_pages_per_block=bkv, num_queries_per_block=bq)


def choose_impl(impl: str, *, head_dim: int, heads: int, kv_heads: int, dtype, kv_dtype=None,
                window: int = 0, sinks: int = 0, softcap: float = 0.0) -> str:
    """'pallas' or 'xla' for a call with these settings on the platform compiled for
    (see the module docstring); raises ValueError for impl='pallas' on a TPU target with
    settings the kernel does not take."""
    if impl not in IMPLS:
        raise ValueError(f"paged_attention: impl must be one of {IMPLS}, got {impl!r}")
    chosen = resolve("paged_attention", impl, pallas_on=("tpu",))
    if chosen != "pallas":
        return chosen
    why = unsupported(head_dim=head_dim, heads=heads, kv_heads=kv_heads, dtype=dtype,
                      kv_dtype=kv_dtype, window=window, sinks=sinks, softcap=softcap)
    if not why:
        return "pallas"
    if impl == "pallas":
        raise ValueError(f"paged_attention: the TPU kernel does not support {why}; "
                         "use impl='xla' (or 'auto', which falls back to it)")
    if why not in _LOGGED:
        _LOGGED.add(why)
        log.warning("paged_attention: the TPU kernel does not support %s; using the XLA "
                    "implementation", why)
    return "xla"


def paged_attention(q_NHD, kv_pages, kv_lens_S, page_indices_SM, cu_q_lens_S1, num_seqs_1,
                    *, scale: float, window: int = 0, sinks: int = 0, softcap: float = 0.0,
                    impl: str = "auto", device_kind: str | None = None) -> jax.Array:
    """Ragged paged attention -> out_NHD (q's dtype). Inputs and semantics: the module
    docstring. `sinks` > 0 is accepted only to be refused by the kernel (impl='pallas'
    raises, 'auto' takes the xla path, which has no sinks either: ValueError there too,
    the caller keeps its own sink-aware path). `device_kind` (a TPU generation's, e.g.
    the mesh's devices') picks the kernel's block sizes; None: this host's TPU if any."""
    n, h, d = q_NHD.shape
    kv = kv_pages.shape[2] // 2
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2 or kv_pages.shape[3] != d:
        raise ValueError(f"paged_attention: kv_pages must be [pages, page_size, 2*KV, "
                         f"{d}], got {kv_pages.shape}")
    s = page_indices_SM.shape[0]
    if kv_lens_S.shape != (s,) or cu_q_lens_S1.shape != (s + 1,) or num_seqs_1.shape != (1,):
        raise ValueError(f"paged_attention: kv_lens [S], cu_q_lens [S+1], num_seqs [1] with "
                         f"S = {s} (page_indices' rows); got {kv_lens_S.shape}, "
                         f"{cu_q_lens_S1.shape}, {num_seqs_1.shape}")
    chosen = choose_impl(impl, head_dim=d, heads=h, kv_heads=kv, dtype=q_NHD.dtype,
                         kv_dtype=kv_pages.dtype, window=window, sinks=sinks, softcap=softcap)
    if sinks:
        raise ValueError("paged_attention: sink tokens are not supported (neither the TPU "
                         "kernel nor its xla twin has them)")
    args = (q_NHD, kv_pages, kv_lens_S, page_indices_SM, cu_q_lens_S1, num_seqs_1)
    if chosen == "pallas":
        if device_kind is None and target_platform() == "tpu" and jax.default_backend() != "tpu":
            log.warning("paged_attention: compiling for TPU without a device_kind: "
                        "upstream's default block sizes")
        return paged_attention_pallas(*args, scale=scale, window=window, softcap=softcap,
                                      device_kind=device_kind)
    return paged_attention_xla(*args, scale=scale, window=window, softcap=softcap)


__all__ = ["paged_attention", "paged_attention_xla", "paged_attention_pallas", "supports",
           "unsupported", "block_sizes", "combine_kv", "split_kv", "choose_impl", "KERNEL_NAME"]
