"""Pallas flash attention (CPU interpret mode) against the dense jnp reference, and the
reference against a naive per-head numpy loop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels.attention import attention, attention_reference, flash_attention

# Jitted once per static config: eager op-by-op dispatch is slow on a busy CPU.
reference = jax.jit(attention_reference, static_argnames=("causal", "window", "sinks", "scale"))


def segments(t: int, *rows: list[tuple[int, int]]) -> jnp.ndarray:
    """Segment ids [len(rows), t] from (id, length) runs; the last run fills the row."""
    out = np.zeros((len(rows), t), np.int32)
    for r, runs in enumerate(rows):
        c = 0
        for seg, n in runs:
            out[r, c:c + n] = seg
            c += n
        out[r, c:] = runs[-1][0]
    return jnp.asarray(out)


# Document boundaries deliberately off every block edge; id 0 = a trailing padding run.
SEG_A = segments(80, [(1, 13), (2, 30), (3, 20), (4, 17)], [(1, 37), (2, 25), (0, 18)])
SEG_B = segments(64, [(1, 7), (2, 29), (3, 28)])
SEG_B2 = segments(64, [(1, 7), (2, 29), (3, 28)], [(5, 40), (0, 24)])

# Windows of 2 and 18 (== 2 mod every block size used) put the window-derived loop
# bounds exactly on a block edge, so an off-by-one there changes the result.
# id, dtype, B, T, H, KV, D, block_q, block_k, causal, segment_ids, window, sinks
CASES = [
    ("f32-mha-causal", jnp.float32, 2, 64, 2, 2, 16, 16, 16, True, None, 0, 0),
    ("f32-gqa2-causal-docs-T80", jnp.float32, 2, 80, 4, 2, 32, 32, 32, True, SEG_A, 0, 0),
    # D=24 exercises the head-dim padding to a power of two.
    ("f32-gqa4-bidir-docs-d24", jnp.float32, 1, 64, 4, 1, 24, 16, 32, False, SEG_B, 0, 0),
    ("f32-gqa2-window2-docs", jnp.float32, 1, 64, 2, 1, 16, 16, 32, True, SEG_B, 2, 0),
    ("f32-window18-bq>bk", jnp.float32, 1, 64, 2, 2, 16, 32, 16, True, None, 18, 0),
    ("f32-window6-sinks2-docs-T80", jnp.float32, 2, 80, 2, 2, 16, 32, 16, True, SEG_A, 6, 2),
    ("f32-gqa4-bidir-window7-sinks3-T40", jnp.float32, 1, 40, 4, 1, 32, 32, 16, False, None, 7, 3),
    ("f32-bidir-unmasked", jnp.float32, 1, 64, 2, 1, 32, 32, 32, False, None, 0, 0),
    ("bf16-mha-causal-docs", jnp.bfloat16, 2, 64, 2, 2, 16, 16, 16, True, SEG_B2, 0, 0),
    ("bf16-gqa2-bidir-window10-sinks4-T80", jnp.bfloat16, 2, 80, 4, 2, 32, 32, 32, False, SEG_A,
     10, 4),
    ("bf16-gqa4-causal-T80", jnp.bfloat16, 1, 80, 4, 1, 16, 32, 16, True, None, 0, 0),
]


def inputs(dtype, b, t, h, kv, d, seed=0):
    # numpy, not jax.random: eager threefry compiles take seconds on a busy CPU.
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)]
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]


def outputs_and_grads(fn, q, k, v, ct):
    """(out, lse, row_max, dq, dk, dv) for a function returning (out, lse, row_max)."""
    def f(q, k, v):
        out, lse, row_max = fn(q, k, v)
        return out, (lse, row_max)
    out, vjp, (lse, row_max) = jax.vjp(f, q, k, v, has_aux=True)
    return (out, lse, row_max, *vjp(ct))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_matches_reference(case):
    _, dtype, b, t, h, kv, d, bq, bk, causal, seg, window, sinks = case
    q, k, v, ct = inputs(dtype, b, t, h, kv, d)
    mask_kw = {"segment_ids": seg, "causal": causal, "window": window, "sinks": sinks}

    # One jit per side so each case compiles once (interpret mode compiles slowly).
    got = jax.jit(lambda *a: outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, block_q=bq, block_k=bk, interpret=True,
                                        return_stats=True, **mask_kw), *a))(q, k, v, ct)
    want = jax.jit(lambda *a: outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, **mask_kw), *a))(q, k, v, ct)

    for name, g, w in zip(("out", "lse", "row_max", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), name
        if dtype == jnp.bfloat16:
            np.testing.assert_allclose(g, w, atol=2e-2, rtol=2e-2, err_msg=name)
        elif name in ("out", "lse", "row_max"):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("window,sinks", [(0, 0), (6, 2)])
def test_flash_soft_cap_matches_reference(window, sinks):
    """softcap: logits -> c * tanh(logits / c) in the forward, its derivative in both
    backward kernels; row_max reports the capped logits."""
    q, k, v, ct = inputs(jnp.float32, 2, 80, 4, 2, 16)
    mask_kw = {"segment_ids": SEG_A, "window": window, "sinks": sinks, "softcap": 0.5}
    got = jax.jit(lambda *a: outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, block_q=32, block_k=16, interpret=True,
                                        return_stats=True, **mask_kw), *a))(q, k, v, ct)
    want = jax.jit(lambda *a: outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, **mask_kw), *a))(q, k, v, ct)
    for name, g, w in zip(("out", "lse", "row_max", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4,
                                   err_msg=name)
    assert float(jnp.max(got[2])) < 0.5
    uncapped = attention_reference(q, k, v, **{**mask_kw, "softcap": 0.0})[0]
    assert not np.allclose(uncapped, want[0], atol=1e-3)


def naive_attention(q, k, v, seg, *, causal, window, sinks, scale):
    """Literal per-(batch, head, query) loop over the visibility rule."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    lse = np.full((b, h, t), -np.inf)
    row_max = np.full((b, h, t), -np.inf)
    for bi in range(b):
        pos = np.zeros(t, int)
        for i in range(1, t):
            pos[i] = pos[i - 1] + 1 if seg[bi, i] == seg[bi, i - 1] else 0
        for hi in range(h):
            for i in range(t):
                vis = [j for j in range(t)
                       if seg[bi, i] == seg[bi, j] and (not causal or j <= i)
                       and (window == 0 or pos[i] - pos[j] < window or pos[j] < sinks)]
                if not vis:
                    continue
                logits = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in vis]) * scale
                m = logits.max()
                w = np.exp(logits - m)
                out[bi, i, hi] = (w / w.sum()) @ v[bi, vis, hi // group]
                lse[bi, hi, i] = m + math.log(w.sum())
                row_max[bi, hi, i] = m
    return out, lse, row_max


@pytest.mark.parametrize("causal,window,sinks", [(True, 0, 0), (True, 3, 2), (False, 4, 0)])
def test_reference_matches_naive_loop(causal, window, sinks):
    q, k, v, _ = inputs(jnp.float32, 2, 12, 4, 2, 8, seed=1)
    seg = np.array([[3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7, 7], [1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0]],
                   np.int32)
    want = naive_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), seg,
                           causal=causal, window=window, sinks=sinks, scale=0.3)
    got = reference(q, k, v, segment_ids=jnp.asarray(seg), causal=causal, window=window,
                    sinks=sinks, scale=0.3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)


def test_reference_default_scale_and_one_document():
    q, k, v, _ = inputs(jnp.float32, 1, 10, 2, 2, 16, seed=2)
    got = reference(q, k, v, window=4, sinks=1)
    want = naive_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                           np.zeros((1, 10), np.int32), causal=True, window=4, sinks=1,
                           scale=1 / 4)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)


def test_attention_dispatch():
    q, k, v, _ = inputs(jnp.float32, 1, 32, 2, 1, 16, seed=3)
    ref = reference(q, k, v, window=8)
    for impl in ("xla", "auto"):  # auto = xla on CPU
        got = jax.jit(lambda q, k, v, impl=impl: attention(
            q, k, v, impl=impl, window=8, block_q=16))(q, k, v)
        for g, w in zip(got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6)
    # flash_attention is jitted itself; interpret=None must pick interpret mode on CPU.
    got = attention(q, k, v, impl="pallas", window=8, block_q=16, block_k=16)
    for g, w in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5)
    out = flash_attention(q, k, v, window=8, block_q=16, block_k=16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref[0]), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="cuda")


def test_bad_arguments():
    q, k, v, _ = inputs(jnp.float32, 1, 32, 2, 1, 16)
    with pytest.raises(ValueError, match="self-attention"):
        attention_reference(q, k[:, :16], v[:, :16])
    with pytest.raises(ValueError, match="self-attention"):
        flash_attention(q, k[:, :16], v[:, :16])
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, block_q=24)
    with pytest.raises(ValueError, match="divide"):
        attention_reference(q[:, :, :1], k.repeat(2, axis=2), v.repeat(2, axis=2))
