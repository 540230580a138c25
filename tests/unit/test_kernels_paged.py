"""Paged attention over the engine's page pool (kernels/attention/paged.py): the xla path
against JAX's `ref_ragged_paged_attention` (the TPU kernel's own reference) on ragged
batches mixing decode rows (q_len 1), whole prefills and prefill tails, GQA / MHA / MQA,
windows, soft caps, padding rows and unused sequence rows; the window mapping against
lmlab's dense `attention_reference`; what `supports` refuses, the dispatch and the block
table. The TPU kernel itself: tests/e2e/test_kernels_paged_tpu.py (compiled for TPU
topologies: it does not run in Pallas's interpret modes in JAX 0.12)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from lm.kernels.attention import attention_reference
from lm.kernels.attention.paged import (block_sizes, choose_impl, combine_kv, paged_attention,
                                        paged_attention_xla, split_kv, supports, unsupported)
from lm.kernels.dispatch import compiling_for

D, PS = 32, 8  # head dim (the xla path takes any), page size


def batch(q_lens, kv_lens, h, kv, *, n=None, rows=None, max_pages=None, dtype=jnp.float32,
          seed=0):
    """A ragged batch: sequence i has kv_lens[i] keys in pages scattered over the pool
    (page 0, the trash page, holds garbage and is never listed for a real page), its
    q_lens[i] queries the last ones. `n`: query rows (padding after the real ones);
    `rows`: sequence rows of the page table (beyond len(q_lens): unused, garbage)."""
    rng = np.random.default_rng(seed)
    s = len(q_lens)
    rows = rows or s
    m = max_pages or max(-(-k // PS) for k in kv_lens)
    pages = 1 + rows * m
    perm = 1 + rng.permutation(pages - 1)
    table = perm[: rows * m].reshape(rows, m).astype(np.int32)
    kv_lens_s = np.array(list(kv_lens) + list(rng.integers(1, m * PS, rows - s)), np.int32)
    cu = np.zeros(rows + 1, np.int32)
    cu[1:s + 1] = np.cumsum(q_lens)
    cu[s + 1:] = cu[s] + np.arange(1, rows - s + 1)  # garbage past num_seqs
    n = n or int(cu[s])
    q = jnp.asarray(rng.standard_normal((n, h, D)), dtype)
    pool = jnp.asarray(rng.standard_normal((pages, PS, 2 * kv, D)), dtype)
    return (q, pool, jnp.asarray(kv_lens_s), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray([s], np.int32))


def ref(args, **kw):
    """Upstream's reference (a Python loop over sequences) on the real rows."""
    kw = {"sliding_window": kw.get("window") or None, "soft_cap": kw.get("softcap") or None,
          "sm_scale": kw["scale"]}
    return ref_ragged_paged_attention(*args, **kw)


xla = jax.jit(paged_attention_xla, static_argnames=("scale", "window", "softcap"))

CASES = [
    # id, q_lens, kv_lens, H, KV, window, softcap
    ("decode-gqa", [1, 1, 1, 1], [5, 17, 8, 40], 4, 2, 0, 0.0),
    ("prefill-mha", [13, 24], [13, 24], 2, 2, 0, 0.0),
    ("mixed-gqa4-window", [1, 9, 1, 20], [33, 9, 2, 37], 8, 2, 6, 0.0),
    ("mixed-mqa-softcap", [3, 1, 16], [11, 30, 16], 4, 1, 0, 1.5),
    ("tails-window1-softcap", [4, 7, 1], [19, 7, 1], 4, 2, 1, 3.0),
    ("window-over-len", [5, 1], [12, 6], 4, 4, 64, 0.0),
]


@pytest.mark.parametrize("q_lens,kv_lens,h,kv,window,softcap",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_xla_path_matches_upstream_reference(q_lens, kv_lens, h, kv, window, softcap):
    args = batch(q_lens, kv_lens, h, kv)
    kw = dict(scale=1 / math.sqrt(D), window=window, softcap=softcap)
    out = xla(*args, **kw)
    expected = ref(args, **kw)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    if window and window < max(kv_lens):  # the case exercises the window: it changes the answer
        assert float(jnp.max(jnp.abs(out - xla(*args, **{**kw, "window": 0})))) > 1e-3


def test_padding_rows_and_unused_sequences():
    """Query rows past cu_q_lens[num_seqs] are zeros; sequence rows past num_seqs (with
    garbage lengths, tables and offsets) change nothing; a longer page table row changes
    nothing either (the extra pages are masked by kv_len)."""
    q_lens, kv_lens = [1, 6, 1], [9, 6, 21]
    args = batch(q_lens, kv_lens, 4, 2, n=16, rows=6, max_pages=5)
    kw = dict(scale=0.3, window=0, softcap=0.0)
    out = xla(*args, **kw)
    real = sum(q_lens)
    np.testing.assert_allclose(out[:real], ref(args, **kw), atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(out[real:]))


def test_bfloat16():
    args = batch([1, 12, 1], [30, 12, 7], 8, 2, dtype=jnp.bfloat16)
    kw = dict(scale=1 / math.sqrt(D), window=5, softcap=0.0)
    out = xla(*args, **kw)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref(args, **kw).astype(np.float32),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [0, 1, 5, 16])
def test_window_is_lmlab_window(window):
    """A whole-sequence prefill through the pages equals lmlab's dense causal attention
    with the same window (key visible iff q_pos - k_pos < window): the kernel's
    `sliding_window` takes lmlab's window unchanged."""
    t, h, kv = 21, 4, 2
    args = batch([t], [t], h, kv, seed=3)
    q, pool, _, table, *_ = args
    k, v = split_kv(pool)
    dense_k = k[table[0]].reshape(-1, kv, D)[None, :t]
    dense_v = v[table[0]].reshape(-1, kv, D)[None, :t]
    out = xla(*args, scale=0.25, window=window, softcap=0.0)
    expected = attention_reference(q[None], dense_k, dense_v, window=window, scale=0.25)[0][0]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_combine_split_layout():
    """keys at even combined heads, values at odd: k0 v0 k1 v1 ..."""
    k = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4)
    v = -k
    pool = combine_kv(k, v)
    assert pool.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(pool[:, :, 0], k[:, :, 0])
    np.testing.assert_array_equal(pool[:, :, 1], v[:, :, 0])
    np.testing.assert_array_equal(pool[:, :, 2], k[:, :, 1])
    back_k, back_v = split_kv(pool)
    np.testing.assert_array_equal(back_k, k)
    np.testing.assert_array_equal(back_v, v)


def test_supports():
    ok = dict(head_dim=128, heads=32, kv_heads=8, dtype=jnp.bfloat16)
    assert supports(**ok) and supports(**ok, window=4096, softcap=30.0)
    assert supports(**{**ok, "dtype": jnp.float32})
    assert "sink" in unsupported(**ok, window=64, sinks=4)
    assert "head_dim 64" in unsupported(**{**ok, "head_dim": 64})
    assert "head_dim 256" in unsupported(**{**ok, "head_dim": 256})
    assert "3 kv heads" in unsupported(**{**ok, "heads": 12, "kv_heads": 3})
    assert "share a dtype" in unsupported(**ok, kv_dtype=jnp.float32)


def test_dispatch():
    shape = dict(head_dim=128, heads=8, kv_heads=2, dtype=jnp.bfloat16)
    with compiling_for("cpu"):
        assert choose_impl("auto", **shape) == "xla"
        assert choose_impl("pallas", **shape) == "xla"  # no kernel off TPU: logged fallback
    with compiling_for("tpu"):
        assert choose_impl("auto", **shape) == "pallas"
        assert choose_impl("auto", **shape, sinks=4, window=8) == "xla"
        assert choose_impl("auto", **{**shape, "head_dim": 64}) == "xla"
        with pytest.raises(ValueError, match="sink tokens"):
            choose_impl("pallas", **shape, sinks=4, window=8)
    with pytest.raises(ValueError, match="impl must be"):
        choose_impl("splash", **shape)


def test_entry_point_runs_xla_on_cpu_and_refuses_sinks():
    args = batch([1, 4], [7, 4], 4, 2)
    with compiling_for("cpu"):
        out = paged_attention(*args, scale=0.5, window=3, impl="auto")
        np.testing.assert_allclose(out, ref(args, scale=0.5, window=3), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="sink tokens"):
            paged_attention(*args, scale=0.5, window=3, sinks=2)
        with pytest.raises(ValueError, match="kv_lens"):
            paged_attention(args[0], args[1], args[2][:1], *args[3:], scale=0.5)


def test_block_sizes():
    """Upstream's tuned entry where the shapes are in its table; the nearest tuned entry
    for a decode step's few tokens; a VMEM-bounded default where nothing is tuned."""
    bf16 = jnp.bfloat16
    # In the table ('TPU v5', 32 q / 8 kv heads per block, page 16, 1024 tokens, len 128).
    assert block_sizes("TPU v5 lite", bf16, bf16, 32, 8, 128, 16, 1024, 8) == (8, 32)
    assert block_sizes("TPU v6 lite", bf16, bf16, 32, 8, 128, 16, 1024, 8) == (4, 32)
    # 32 decode rows: nearest in tokens is the 512 row of the same length; sequences of
    # 2048 (128 pages of 16): nearest is the longest tuned, 256.
    assert block_sizes("TPU v5 lite", bf16, bf16, 32, 8, 128, 16, 32, 8) == (8, 32)
    assert block_sizes("TPU v5 lite", bf16, bf16, 32, 8, 128, 16, 32, 128) == (16, 32)
    # Untuned (float32): 128 pages halved until 2 x block <= 4 MiB, clipped to the row.
    assert block_sizes("TPU v5 lite", jnp.float32, jnp.float32, 8, 2, 128, 16, 32, 256) == (64, 32)
    assert block_sizes(None, jnp.float32, jnp.float32, 8, 2, 128, 16, 8, 4) == (4, 8)
    assert block_sizes("TPU v4", bf16, bf16, 8, 2, 128, 16, 64, 64) == (32, 32)
