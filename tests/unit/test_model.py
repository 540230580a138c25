"""Model correctness against plain references: causality, GQA == MHA, packed-document
isolation, scan == loop, every block variant trains, KV-cache == full forward."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import overfit_losses
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.model.mixers.attention import AttentionConfig
from lm.model.mixers.mlp import MLPConfig
from lm.model.layers import rope

TINY = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, head_dim=8,
                   max_seq_len=64)


def make(cfg=TINY, seed=0):
    return Transformer(cfg, nnx.Rngs(seed))


def jitted(model):
    """The model's forward under jit (eager NNX dispatches op by op: slow)."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, *args, **kw: nnx.merge(graphdef, p)(*args, **kw))
    return lambda *args, **kw: forward(params, *args, **kw)


def tokens(b=2, t=16, seed=1, vocab=61):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = jitted(make())
    x = tokens()
    logits, _ = model(x)
    for t in (3, 9, 15):
        y = x.at[:, t].set((x[:, t] + 7) % 61)
        changed, _ = model(y)
        np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(changed[:, :t]))
        assert not np.allclose(logits[:, t:], changed[:, t:])


def reference_attention(attn, x_BTD, positions_BT):
    """Per-head multi-head attention written plainly: K/V head h // group serves
    query head h; causal softmax(q k^T / sqrt(d)) v."""
    wq, wk, wv, wo = (np.asarray(p[...]) for p in (attn.wq, attn.wk, attn.wv, attn.wo))
    x = np.asarray(x_BTD)
    b, t, _ = x.shape
    h, kv = wq.shape[1], wk.shape[1]
    out = np.zeros((b, t, h, wq.shape[2]), np.float32)
    for head in range(h):
        q = np.asarray(rope(jnp.asarray(np.einsum("btd,dk->btk", x, wq[:, head])[:, :, None]),
                            positions_BT, attn.rope_theta))[:, :, 0]
        kh = head // (h // kv)
        k = np.asarray(rope(jnp.asarray(np.einsum("btd,dk->btk", x, wk[:, kh])[:, :, None]),
                            positions_BT, attn.rope_theta))[:, :, 0]
        v = np.einsum("btd,dk->btk", x, wv[:, kh])
        s = np.einsum("bqk,bsk->bqs", q, k) / math.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bqs,bsk->bqk", p, v)
    return np.einsum("bthk,hkd->btd", out, wo)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_plain_multihead_reference(n_kv_heads):
    cfg = dataclasses.replace(TINY, n_kv_heads=n_kv_heads)
    attn = make(cfg).blocks[0].mixer
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    y, _, _ = attn(x, pos, jnp.ones((2, 12), jnp.int32))
    np.testing.assert_allclose(np.asarray(y), reference_attention(attn, x, pos),
                               rtol=1e-5, atol=1e-5)


def test_gqa_equals_multihead_with_each_kv_head_repeated_for_its_group():
    """A GQA model (4 query heads, 2 KV heads) gives the logits of the multi-head model
    whose K/V projections are the GQA ones repeated per group (query heads 0, 1 read KV
    head 0; 2, 3 read KV head 1), every other weight copied. A wrong head-to-group map
    (tiled instead of repeated KV heads) gives other logits."""
    gqa = make(dataclasses.replace(TINY, n_kv_heads=2))
    group = TINY.n_heads // 2
    x = tokens()

    def multihead(expand):
        mha = make(dataclasses.replace(TINY, n_kv_heads=TINY.n_heads), seed=1)
        state = nnx.state(mha, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
            lambda path, w: expand(w) if getattr(path[-1], "key", None) in ("wk", "wv") else w,
            nnx.to_pure_dict(nnx.state(gqa, nnx.Param))))
        nnx.update(mha, state)
        return np.asarray(jitted(mha)(x)[0])

    logits = np.asarray(jitted(gqa)(x)[0])
    np.testing.assert_allclose(logits, multihead(lambda w: jnp.repeat(w, group, axis=1)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits, multihead(lambda w: jnp.tile(w, (1, group, 1))), atol=1e-3)


def test_packed_documents_do_not_attend_to_each_other():
    model = jitted(make())
    doc_a, doc_b = tokens(1, 7, seed=4), tokens(1, 9, seed=5)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 9])
    positions = jnp.array([list(range(7)) + list(range(9))])
    logits, _ = model(packed, positions, segments)
    alone_a, _ = model(doc_a)
    alone_b, _ = model(doc_b)
    np.testing.assert_allclose(logits[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:], alone_b, rtol=1e-5, atol=1e-5)
    # And without segment ids, document b would see document a.
    mixed, _ = model(packed, positions)
    assert not np.allclose(mixed[:, 7:], alone_b, atol=1e-3)


def test_scanned_layers_equal_the_layer_loop():
    loop_cfg = dataclasses.replace(TINY, qk_norm=True, norm_position="peri",
                                   layernorm_scaling=True)
    looped = make(loop_cfg)
    scanned = make(dataclasses.replace(loop_cfg, scan_layers=True))
    params = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
    blocks = [params["blocks"][i] for i in range(loop_cfg.n_layers)]
    stacked = dict(params, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
    nnx.update(scanned, stacked)
    x = tokens()
    a, aux_a = looped(x)
    b, aux_b = scanned(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_a["attn_logit_max"], aux_b["attn_logit_max"], rtol=1e-5)


VARIANTS = list(itertools.product(["pre", "post", "peri", "out"], [False, True],
                                  [False, True], ["standard", "mup"]))


@pytest.mark.parametrize("position,qk_norm,parallel,init", VARIANTS)
def test_every_block_variant_overfits_a_tiny_batch(position, qk_norm, parallel, init):
    cfg = dataclasses.replace(
        TINY, norm_position=position, qk_norm=qk_norm, parallel_block=parallel, init=init,
        layernorm_scaling=position == "pre" and parallel, mlp=MLPConfig("swiglu" if qk_norm else "gelu"),
        norm="layer" if init == "mup" else "rms", tie_embeddings=not parallel)
    losses = overfit_losses(make(cfg), optax.adam(1e-2), tokens(4, 16, seed=7), 40)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def assert_cached_decoding_is_the_full_forward(cfg, length: int, prefill: int) -> None:
    """Prefill `prefill` tokens into a KV cache, then decode one token at a time: every
    step's logits equal the full forward pass's at that position."""
    eager = make(cfg)
    model = jitted(eager)
    x = tokens(2, length, seed=9)
    full, _ = model(x)
    logits, aux = model(x[:, :prefill], cache=eager.init_cache(2, length), cache_index=0)
    np.testing.assert_allclose(logits, full[:, :prefill], rtol=1e-5, atol=1e-5)
    cache = aux["cache"]
    for t in range(prefill, length):
        step_logits, aux = model(x[:, t:t + 1], cache=cache, cache_index=t)
        cache = aux["cache"]
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_gives_the_full_forward_logits(scan_layers):
    cfg = dataclasses.replace(TINY, n_kv_heads=2, scan_layers=scan_layers, qk_norm=True)
    assert_cached_decoding_is_the_full_forward(cfg, 20, 8)


def test_logit_softcap_bounds_logits():
    cfg = dataclasses.replace(TINY, logit_softcap=2.0, init_std=1.0)
    logits, _ = make(cfg)(tokens())
    assert float(jnp.max(jnp.abs(logits))) <= 2.0


@pytest.mark.parametrize("embed_norm", [False, True])
def test_embed_norm_makes_the_stack_blind_to_the_embeddings_scale(embed_norm):
    # Peri-LN's y0 = Norm(x_emb): scaling the (untied) embedding table changes nothing
    cfg = dataclasses.replace(TINY, norm_position="peri", embed_norm=embed_norm,
                              tie_embeddings=False)
    model = make(cfg)
    before = jitted(model)(tokens())[0]
    model.embed[...] = model.embed[...] * 30.0
    after = jitted(model)(tokens())[0]
    change = float(jnp.max(jnp.abs(after - before)))  # norm_eps leaves ~1e-4 with the norm
    assert (change < 1e-3) if embed_norm else (change > 1e-2), change


def test_bf16_compute_runs_close_to_f32():
    x = tokens()
    f32, _ = make(TINY)(x)
    bf16, _ = make(dataclasses.replace(TINY, compute_dtype="bfloat16"))(x)
    assert bf16.dtype == jnp.float32  # logits are always returned in f32
    np.testing.assert_allclose(f32, bf16, atol=0.1)


def test_every_parameter_has_logical_axes():
    from lm.model import param_axes
    for scan in (False, True):
        model = make(dataclasses.replace(TINY, scan_layers=scan, qk_norm=True,
                                         tie_embeddings=False))
        axes = param_axes(model)
        shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        flat_shapes = jax.tree.leaves(shapes)
        assert len(flat_axes) == len(flat_shapes)
        for a, s in zip(flat_axes, flat_shapes):
            assert len(a) == s.ndim
        assert any(a[0] == "layers" for a in flat_axes) == scan
        assert ("vocab", "embed") in flat_axes and ("embed", "vocab") in flat_axes


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "geglu"])
def test_mlp_custom_backward_equals_autodiff(kind):
    from lm.model.mixers.mlp import GATED, activation, mlp_core
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (2, 8, 16))
    w_ins = tuple(0.2 * jax.random.normal(k, (16, 32)) for k in keys[1:1 + (2 if kind in GATED else 1)])
    w_out = 0.2 * jax.random.normal(keys[4], (16, 32))  # stored [embed, mlp]
    cot = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 16))

    def plain(x, w_ins, w_out):
        return activation(kind, tuple(x @ w for w in w_ins)) @ w_out.T

    for fn in (plain, lambda *a: mlp_core(kind, *a)):
        out, vjp = jax.vjp(fn, x, w_ins, w_out)
        if fn is plain:
            ref_out, ref_grads = out, vjp(cot)
        else:
            np.testing.assert_allclose(out, ref_out, rtol=1e-6)
            for g, r in zip(jax.tree.leaves(vjp(cot)), jax.tree.leaves(ref_grads)):
                np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", True), ("dots_no_batch", False)])
def test_remat_policies_give_the_same_loss_and_gradients(remat, scan):
    base = dataclasses.replace(TINY, scan_layers=scan, qk_norm=True)
    graphdef, params = nnx.split(make(base))
    graphdef_r, _ = nnx.split(make(dataclasses.replace(base, remat=remat)))
    x = tokens(2, 16, seed=11)

    def loss(g, p):
        logits, _ = nnx.merge(g, p)(x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    ref = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p)))(params)
    out = jax.jit(jax.value_and_grad(lambda p: loss(graphdef_r, p)))(params)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window,sinks", [(0, 0), (6, 0), (6, 2)])
def test_blocked_causal_attention_equals_one_dense_block(window, sinks):
    """Scoring queries in blocks that skip the keys causality (and the window) hides
    gives the dense result: logits, max attention logits and gradients, on packed rows
    with document boundaries off the block edges and blocks of uneven length."""
    t = 21
    segments = jnp.array([[1] * 5 + [2] * 11 + [3] * 5, [4] * t])
    positions = jnp.array([list(range(5)) + list(range(11)) + list(range(5)), list(range(t))])
    x = tokens(2, t, seed=8)

    def loss_and_grads(q_blocks):
        cfg = dataclasses.replace(TINY, n_kv_heads=2, attention=AttentionConfig(
            window=window, sinks=sinks, q_blocks=q_blocks))
        graphdef, params = nnx.split(make(cfg))

        def loss(p):
            logits, aux = nnx.merge(graphdef, p)(x, positions, segments)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:])
            return ce.mean(), (logits, aux["attn_logit_max"])

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (ref_loss, (ref_logits, ref_max)), ref_grads = loss_and_grads(1)
    for q_blocks in (2, 3, 5):
        (l, (logits, max_logit)), grads = loss_and_grads(q_blocks)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(max_logit, ref_max, rtol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_query_blocks_cover_the_sequence():
    from lm.model.mixers.attention import query_blocks
    assert query_blocks(21, 5) == [(0, 4), (4, 8), (8, 13), (13, 17), (17, 21)]
    assert query_blocks(256, 0) == [(0, 128), (128, 256)]  # auto: >= 128 queries a block
    assert len(query_blocks(4096, 0)) == 8 and query_blocks(100, 0) == [(0, 100)]
    assert query_blocks(3, 8) == [(0, 1), (1, 2), (2, 3)]


# ------------------------------------------------ knobs of the Hugging Face families


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_params(model, params: dict):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def test_norm_position_out_normalises_only_the_sublayer_outputs():
    """OLMo 2: x + N(attn(x)), then + N(mlp(.)): no norm on a sublayer's input."""
    cfg = dataclasses.replace(TINY, norm_position="out", n_layers=1)
    model = make(cfg)
    block = model.blocks[0]
    assert not hasattr(block, "norm1") and not hasattr(block, "norm2")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 10, cfg.d_model))
    pos, seg = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32)
    got = block(x, pos, seg, jnp.float32(0))[0]
    h = x + block.attn_out_norm(block.mixer(x, pos, seg)[0])
    want = h + block.mlp_out_norm(block.channel(h))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(model.blocks[0].attn_out_norm.scale[...]))) > 0


def test_qk_norm_scope_all_normalises_all_heads_at_once():
    """Scaling one query head's projection: a per-head norm undoes it, a norm over all
    heads' queries together (OLMo 2) does not; scaling every head it undoes."""
    x = tokens()

    def change(scope, heads):
        model = make(dataclasses.replace(TINY, qk_norm=True, qk_norm_scope=scope))
        before = jitted(model)(x)[0]
        p = _params(model)
        for b in p["blocks"].values():
            b["mixer"]["wq"] = b["mixer"]["wq"].at[:, heads].multiply(5.0)
        after = jitted(_with_params(model, p))(x)[0]
        return float(jnp.max(jnp.abs(after - before)))

    assert make(dataclasses.replace(TINY, qk_norm=True, qk_norm_scope="all")).blocks[
        0].mixer.q_norm.scale.shape == (TINY.n_heads * TINY.dh,)
    assert change("head", slice(0, 1)) < 1e-4
    assert change("all", slice(0, 1)) > 1e-2
    assert change("all", slice(None)) < 1e-4


def test_scale_embeddings_multiplies_the_embeddings_by_sqrt_d():
    """Gemma: the same as a table sqrt(d_model) times larger (untied readout)."""
    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    scaled = make(dataclasses.replace(cfg, scale_embeddings=True))
    p = _params(scaled)
    plain = _with_params(make(cfg), dict(p, embed=p["embed"] * math.sqrt(cfg.d_model)))
    x = tokens()
    np.testing.assert_allclose(jitted(scaled)(x)[0], jitted(plain)(x)[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(jitted(scaled)(x)[0], jitted(_with_params(make(cfg), p))(x)[0],
                           atol=1e-3)


def test_geglu_is_a_tanh_gelu_gate_times_the_up_projection():
    from lm.model.mixers.mlp import MLP
    cfg = dataclasses.replace(TINY, mlp=MLPConfig("geglu", 2.0))
    mlp = MLP(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, cfg.d_model))
    g, u, o = (np.asarray(w[...]) for w in (mlp.w_gate, mlp.w_in, mlp.w_out))
    a = np.asarray(x) @ g
    gelu_tanh = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    np.testing.assert_allclose(mlp(x), (gelu_tanh * (np.asarray(x) @ u)) @ o.T,
                               rtol=1e-5, atol=1e-5)


def test_scale_dim_sets_the_attention_logit_scale():
    """q.k / sqrt(4 head_dim) is q/2 . k / sqrt(head_dim): a query projection halved."""
    cfg = dataclasses.replace(TINY, attention=AttentionConfig(scale_dim=4.0 * TINY.dh))
    scaled = make(cfg)
    p = _params(scaled)
    halved = jax.tree_util.tree_map_with_path(
        lambda path, w: w / 2 if getattr(path[-1], "key", None) == "wq" else w, p)
    plain = _with_params(make(TINY), halved)
    x = tokens()
    np.testing.assert_allclose(jitted(scaled)(x)[0], jitted(plain)(x)[0], rtol=1e-5, atol=1e-5)
    assert make(dataclasses.replace(TINY, attention=AttentionConfig(
        scale_dim=float(TINY.dh)))).blocks[0].mixer.scale == make().blocks[0].mixer.scale


def _same_params_logits(cfg, params, x):
    return np.asarray(jitted(_with_params(make(cfg), params))(x)[0])


def test_window_pattern_windows_only_the_local_layers():
    """"lg": layer 0 sees the window, layer 1 everything (Gemma 2). All-local is the plain
    window, all-global no window; the mix is neither."""
    w = AttentionConfig(window=3)
    x = tokens(2, 16)
    cfg = dataclasses.replace(TINY, attention=dataclasses.replace(w, window_pattern="lg"))
    model = make(cfg)
    assert [b.mixer.window for b in model.blocks] == [3, 0]
    p = _params(model)
    mixed = _same_params_logits(cfg, p, x)
    local = _same_params_logits(dataclasses.replace(TINY, attention=w), p, x)
    np.testing.assert_allclose(_same_params_logits(dataclasses.replace(
        TINY, attention=dataclasses.replace(w, window_pattern="l")), p, x), local, atol=1e-6)
    np.testing.assert_allclose(_same_params_logits(dataclasses.replace(
        TINY, attention=dataclasses.replace(w, window_pattern="g")), p, x),
        _same_params_logits(TINY, p, x), atol=1e-6)
    assert not np.allclose(mixed, local, atol=1e-3)
    assert not np.allclose(mixed, _same_params_logits(TINY, p, x), atol=1e-3)


def test_local_rope_theta_is_the_local_layers_unscaled_rope():
    """Gemma 3: local layers rotate at their own base, without the global layers'
    RoPE scaling."""
    from lm.model.rope_scaling import RopeScaling
    att = AttentionConfig(window=3, window_pattern="lg", local_rope_theta=100.0)
    cfg = dataclasses.replace(TINY, rope_theta=1e4, attention=att, init_std=0.3,
                              rope_scaling=RopeScaling(type="linear", factor=2.0))
    model = make(cfg)
    local, glob = model.blocks[0].mixer, model.blocks[1].mixer
    assert (local.rope_theta, local.rope_scaling.type) == (100.0, "none")
    assert (glob.rope_theta, glob.rope_scaling.type) == (1e4, "linear")
    # every layer local: the model whose RoPE base is the local one
    x = tokens()
    all_local = dataclasses.replace(cfg, attention=dataclasses.replace(att, window_pattern="l"))
    p = _params(model)
    plain = dataclasses.replace(TINY, rope_theta=100.0, attention=AttentionConfig(window=3),
                                init_std=0.3)
    np.testing.assert_allclose(_same_params_logits(all_local, p, x),
                               _same_params_logits(plain, p, x), atol=1e-6)
    assert not np.allclose(_same_params_logits(dataclasses.replace(
        all_local, attention=dataclasses.replace(att, window_pattern="l", local_rope_theta=0.0)),
        p, x), _same_params_logits(plain, p, x), atol=1e-3)


def test_kv_cache_decoding_of_a_gemma_like_stack_gives_the_full_forward_logits():
    """Every knob of the Gemma / OLMo families through the decoding path."""
    for cfg in (dataclasses.replace(
            TINY, n_kv_heads=2, norm_position="peri", qk_norm=True, scale_embeddings=True,
            logit_softcap=5.0, mlp=MLPConfig("geglu"), attention=AttentionConfig(
                window=4, window_pattern="lg", local_rope_theta=100.0, scale_dim=12.0,
                softcap=3.0)),
            dataclasses.replace(TINY, n_kv_heads=2, norm_position="out", qk_norm=True,
                                qk_norm_scope="all", mlp=MLPConfig("swiglu"))):
        assert_cached_decoding_is_the_full_forward(cfg, 14, 5)


@pytest.mark.parametrize("change,message", [
    (dict(window_pattern="lx"), "window_pattern='lx' must be a string of l"),
    (dict(window=0, window_pattern="lg"), "window_pattern needs model.attention.window > 0"),
    (dict(window=0, local_rope_theta=10.0), "local_rope_theta needs model.attention.window"),
    (dict(window_pattern="lg", scan_layers=True), "model.scan_layers needs every layer "
                                                  "configured alike"),
    (dict(scale_dim=16.0, init="mup"), "scale_dim sets the logit scale"),
])
def test_per_layer_and_scale_knobs_refuse_what_they_cannot_mean(change, message):
    from lm.config import ConfigError, TrainConfig, validate
    model_kw = {k: change.pop(k) for k in ("scan_layers", "init") if k in change}
    att = AttentionConfig(**{"window": 4, **change})
    cfg = TrainConfig(model=dataclasses.replace(TINY, attention=att, **model_kw))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
