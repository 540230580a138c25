"""Grouped matmul for mixture-of-experts layers: rows of `x` sorted by group (expert),
each group multiplied by its own matrix.

    out[rows of group g] = x[rows of group g] @ w[g]

`x_MK` [M, K] holds the groups' rows contiguously, in group order, group g taking
group_sizes[g] rows; rows after the last group (padding) come out as zeros. `w_GKN`
[G, K, N].

Three implementations, chosen for the platform being compiled for (kernels/dispatch.py):
  * "ragged": `jax.lax.ragged_dot` (XLA lowers it per platform). It is the reference the
    others are tested against. XLA:CPU computes every row against every group's matrix
    and masks (3.6x / 6.8x / 13x the time of one dense matmul of the same rows at 4 / 8 /
    16 groups, `python benchmarks/moe_layer.py --grouped`), so it is not the CPU default.
  * "blocked": each group's rows padded to whole blocks, each block multiplied by its
    group's matrix in one batched matmul (what megablox does in a kernel, in XLA ops):
    at most groups x block rows of padding, and every block's matrix gathered once
    (1.6x / 1.7x / 2.0x the dense matmul in the same run).
  * "megablox": the Pallas TPU grouped matmul from JAX (`jax.experimental.pallas.ops.
    tpu.megablox`, with its custom VJP), on TPU. Off a TPU it runs in Pallas interpret
    mode (tests). Rows are padded to its row tile here, and the padding (and any rows
    beyond the groups, which the kernel leaves unwritten) are zeroed. The K and N tiles
    are 128 for every shape: the backward pass reuses the tiling with K and N swapped,
    and Mosaic takes a 128-multiple block for any dimension (it masks the remainder).
"auto" is megablox on TPU, blocked on CPU, ragged on GPU (not measured there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels.dispatch import target_platform

IMPLS = ("auto", "ragged", "blocked", "megablox")


def grouped_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return {"tpu": "megablox", "cpu": "blocked"}.get(target_platform(), "ragged")
    return impl


def _tile(n: int, at_most: int = 128, multiple: int = 8) -> int:
    return min(at_most, -(-n // multiple) * multiple)


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array,
                   impl: str = "auto") -> jax.Array:
    """[M, N] in x's dtype (accumulated in float32)."""
    impl = grouped_impl(impl)
    if impl == "blocked":
        return _blocked(x_MK, w_GKN, group_sizes_G.astype(jnp.int32))
    if impl == "ragged":
        return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G.astype(jnp.int32),
                                  preferred_element_type=jnp.float32).astype(x_MK.dtype)
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    m, k = x_MK.shape
    n = w_GKN.shape[-1]
    tm = _tile(m)
    pad = -m % tm
    # The kernel leaves rows outside the groups unwritten, forward and in the input's
    # gradient: both are masked (the second through the masked input's VJP).
    covered = (jnp.arange(m + pad) < jnp.sum(group_sizes_G))[:, None]
    x_pad = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
    out = megablox.gmm(jnp.where(covered, x_pad, 0), w_GKN, group_sizes_G.astype(jnp.int32),
                       jnp.float32, (tm, 128, 128), None, None, False,
                       target_platform() != "tpu")
    return jnp.where(covered, out, 0.0)[:m].astype(x_MK.dtype)


def _block_rows(m: int, groups: int) -> int:
    """Rows per block: big enough for an efficient matmul, small enough that the padding
    (up to one block per group) stays a fraction of the rows."""
    return max(8, min(128, 1 << max(3, (m // (2 * groups)).bit_length() - 1)))


def _blocked(x_MK, w_GKN, sizes_G):
    m, k = x_MK.shape
    g, _, n = w_GKN.shape
    b = _block_rows(m, g)
    blocks = -(-m // b) + g  # every group padded to whole blocks fits in these
    ends = jnp.cumsum(sizes_G)
    padded = -(-sizes_G // b) * b
    padded_ends = jnp.cumsum(padded)
    rows = jnp.arange(m)
    group_M = jnp.searchsorted(ends, rows, side="right")  # == g past the last group
    in_group = group_M < g
    group_M = jnp.minimum(group_M, g - 1)
    dest_M = jnp.where(in_group, (padded_ends - padded)[group_M] + rows - (ends - sizes_G)[group_M],
                       blocks * b)  # rows outside the groups go nowhere
    buf = jnp.zeros((blocks * b, k), x_MK.dtype).at[dest_M].set(x_MK, mode="drop")
    block_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(blocks) * b,
                                               side="right"), g - 1)
    out = jnp.einsum("jbk,jkn->jbn", buf.reshape(blocks, b, k), w_GKN[block_group],
                     preferred_element_type=jnp.float32).reshape(blocks * b, n)
    return out.at[dest_M].get(mode="fill", fill_value=0).astype(x_MK.dtype)
