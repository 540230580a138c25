"""The chunked linear-recurrence scan (Pallas in interpret mode, and its XLA twin)
against the token-by-token reference: outputs, final state and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels.scan import linear_scan, scan_associative, scan_reference


def _inputs(b=2, t=40, g=1, h=2, dk=8, dv=16, dtype=jnp.float32, seed=0, segments=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, g, dk)).astype(dtype)
    k = (jax.random.normal(ks[1], (b, t, g, dk)) / np.sqrt(dk)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    a = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)) - 1.0)
    s0 = jax.random.normal(ks[4], (b, h, dk, dv))
    seg = None
    if segments:  # boundaries at 13 and t - 7: not multiples of any chunk size used here
        row = np.concatenate([np.full(13, 1), np.full(t - 20, 2), np.full(7, 3)])
        seg = jnp.asarray(np.stack([row, np.full(t, 7)][:b]), jnp.int32)
    return q, k, v, a, s0, seg


def test_reference_matches_numpy_loop():
    q, k, v, a, s0, seg = _inputs(b=1, t=12, g=1, h=1, dk=3, dv=2, segments=False)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    o, s = scan_reference(q, k, v, a, segment_ids=seg, initial_state=s0)
    qn, kn, vn, an, sn = (np.asarray(x, np.float64) for x in (q, k, v, a, s0))
    state = sn[0, 0]
    for t in range(12):
        if t == 5:
            state = np.zeros_like(state)
        state = np.exp(an[0, t, 0]) * state + np.outer(kn[0, t, 0], vn[0, t, 0])
        np.testing.assert_allclose(o[0, t, 0], qn[0, t, 0] @ state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s[0, 0], state, rtol=1e-5, atol=1e-5)


def test_associative_reference_agrees():
    q, k, v, a, s0, seg = _inputs(g=2, h=4)
    o1, s1 = scan_reference(q, k, v, a, segment_ids=seg, initial_state=s0)
    o2, s2 = scan_associative(q, k, v, a, segment_ids=seg, initial_state=s0)
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def _loss_and_grads(fn, q, k, v, a, s0, cotangents):
    ct_o, ct_s = cotangents

    def loss(q, k, v, a, s0):
        o, s = fn(q, k, v, a, s0)
        return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(s * ct_s)

    (o, s), _ = jax.vjp(fn, q, k, v, a, s0)
    return o, s, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, a, s0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype,groups,t,chunk", [
    (jnp.float32, (1, 1), 40, 16),   # T not a multiple of the chunk
    (jnp.float32, (1, 2), 48, 16),   # q/k shared by 2 heads (Mamba-2 groups)
    (jnp.float32, (2, 8), 32, 8),    # 4 heads per group
    (jnp.bfloat16, (1, 2), 40, 16),
])
def test_scan_matches_reference(impl, dtype, groups, t, chunk):
    g, h = groups
    q, k, v, a, s0, seg = _inputs(t=t, g=g, h=h, dtype=dtype)
    ks = jax.random.split(jax.random.PRNGKey(9), 2)
    cotangents = (jax.random.normal(ks[0], (2, t, h, 16)), jax.random.normal(ks[1], s0.shape))

    def ref(q, k, v, a, s0):
        return scan_reference(q, k, v, a, segment_ids=seg, initial_state=s0)

    def ours(q, k, v, a, s0):
        return linear_scan(q, k, v, a, segment_ids=seg, initial_state=s0,
                           chunk_size=chunk, impl=impl)

    want = _loss_and_grads(ref, q, k, v, a, s0, cotangents)
    got = _loss_and_grads(ours, q, k, v, a, s0, cotangents)
    fwd_tol, grad_tol = (1e-5, 1e-4) if dtype == jnp.float32 else (3e-2, 5e-2)
    assert got[0].dtype == dtype
    for name, x, y in [("out", got[0], want[0]), ("state", got[1], want[1])]:
        scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(x, np.float32) / scale,
                                   np.asarray(y, np.float32) / scale, atol=fwd_tol, err_msg=name)
    for name, x, y in zip(["dq", "dk", "dv", "da", "ds0"], got[2], want[2]):
        assert x.shape == y.shape, name
        scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(x, np.float32) / scale,
                                   np.asarray(y, np.float32) / scale, atol=grad_tol, err_msg=name)


def test_chunked_continuation_equals_one_pass():
    """Scanning two halves with the state handed over equals one scan (what recurrent
    decoding relies on)."""
    q, k, v, a, _, _ = _inputs(segments=False)
    o, s = linear_scan(q, k, v, a, chunk_size=16, impl="pallas")
    o1, s1 = linear_scan(q[:, :25], k[:, :25], v[:, :25], a[:, :25], chunk_size=16,
                         impl="pallas")
    o2, s2 = linear_scan(q[:, 25:], k[:, 25:], v[:, 25:], a[:, 25:], initial_state=s1,
                         chunk_size=16, impl="pallas")
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2, s, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    q, k, v, a, _, _ = _inputs(g=1, h=2)
    with pytest.raises(ValueError, match="log_decay"):
        linear_scan(q, k, v, a[..., :1])
    with pytest.raises(ValueError, match="dividing"):
        linear_scan(jnp.repeat(q, 3, 2), jnp.repeat(k, 3, 2), v, a)


def test_dispatch_by_backend(monkeypatch, caplog):
    from lm.kernels import dispatch
    assert dispatch.resolve("k", "auto") == "xla"  # this CPU: the fast path
    assert dispatch.resolve("k", "pallas") == "pallas"  # interpret mode
    with pytest.raises(ValueError, match="impl"):
        dispatch.resolve("k", "triton")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dispatch.resolve("k", "auto") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with caplog.at_level("WARNING", logger="lmlab.kernels"):  # a kernel without a TPU path
        assert dispatch.resolve("k", "pallas", pallas_on=("gpu", "cpu")) == "xla"
    assert "no Pallas kernel for tpu" in caplog.text
    from lm.kernels.scan.chunked import scan_impl
    assert scan_impl("pallas") == scan_impl("auto") == "pallas"  # the scan has one (tpu.py)
