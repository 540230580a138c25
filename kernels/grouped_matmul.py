"""Grouped matmul for mixture-of-experts layers: rows of `x` sorted by group (expert),
each group multiplied by its own matrix.

    out[rows of group g] = x[rows of group g] @ w[g]

`x_MK` [M, K] holds the groups' rows contiguously, in group order, group g taking
group_sizes[g] rows; rows after the last group (padding) come out as zeros. `w_GKN`
[G, K, N].

Two implementations, chosen for the platform being compiled for (kernels/dispatch.py):
  * "ragged": `jax.lax.ragged_dot`, everywhere (XLA lowers it per platform; on CPU a
    loop of dense matmuls). It is also the reference the kernel is tested against.
  * "megablox": the Pallas TPU grouped matmul from JAX (`jax.experimental.pallas.ops.
    tpu.megablox`, with its custom VJP), on TPU. Off a TPU it runs in Pallas interpret
    mode (tests). Rows are padded to its row tile here, and the padding (and any rows
    beyond the groups, which the kernel leaves unwritten) are zeroed. The K and N tiles
    are 128 for every shape: the backward pass reuses the tiling with K and N swapped,
    and Mosaic takes a 128-multiple block for any dimension (it masks the remainder).
"auto" is megablox on TPU, ragged elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dispatch import target_platform

IMPLS = ("auto", "ragged", "megablox")


def grouped_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "megablox" if target_platform() == "tpu" else "ragged"
    return impl


def _tile(n: int, at_most: int = 128, multiple: int = 8) -> int:
    return min(at_most, -(-n // multiple) * multiple)


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array,
                   impl: str = "auto") -> jax.Array:
    """[M, N] in x's dtype (accumulated in float32)."""
    impl = grouped_impl(impl)
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
