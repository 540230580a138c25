"""Linearization (lm/compress/linearize.py): the construction of a retention layer from an
attention layer against linear attention computed by hand, attention transfer lowering
the per-layer MSE, the linearized model's recurrent decoding against its own full
forward, and the refusals."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.compress import linearize as L
from lm.config import ConfigError, ModelConfig
from lm.model import Transformer
from lm.model.layers import rope
from lm.model.mixers.retention import Retention, RetentionConfig

# GQA (2 kv heads for 4 query heads) so that the kv-head repetition is exercised;
# init_std 0.1: attention far from uniform, so imitating it is not trivial.
PARENT = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     max_seq_len=64, init_std=0.1, retention=RetentionConfig(chunk=8))


@pytest.fixture(scope="module")
def parent_params():
    return nnx.to_pure_dict(nnx.state(Transformer(PARENT, nnx.Rngs(0)), nnx.Param))


def _batch(seed, b=2, t=24):
    x = jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, PARENT.vocab_size)
    return {"inputs": x, "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32)}


def _with_params(cfg, params):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _by_hand(attn: dict, x_BTD, feature_map: str, normalize: str):
    """Causal linear attention from the attention's own Q/K/V/O (no decay): y_t =
    sum_{s<=t} phi(q_t).phi(k_s) v_s, divided by sum_{s<=t} phi(q_t).phi(k_s) when
    normalised, then the output projection."""
    h, kv, dh = PARENT.n_heads, PARENT.kv_heads, PARENT.dh
    t = x_BTD.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), x_BTD.shape[:2])

    def proj(w):  # kv heads repeated for their query heads (GQA)
        y = jnp.einsum("btd,dhk->bthk", x_BTD, w)
        return jnp.repeat(y, h // y.shape[2], axis=2)

    q = rope(proj(attn["wq"]), pos, PARENT.rope_theta, PARENT.max_seq_len)
    k = rope(proj(attn["wk"]), pos, PARENT.rope_theta, PARENT.max_seq_len)
    v = proj(attn["wv"])
    if feature_map == "identity":
        q, k = q, k / np.sqrt(dh)
    elif feature_map == "elu":
        q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    else:  # hedgehog with W = I: [softmax(x), softmax(-x)]
        def phi(z):
            return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)
        q, k = phi(q), phi(k)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * jnp.tril(jnp.ones((t, t)))
    y = jnp.einsum("bhts,bshk->bthk", scores, v)
    if normalize == "sum":
        y = y / (scores.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    assert kv < h
    return jnp.einsum("bthk,hkd->btd", y, attn["wo"])


@pytest.mark.parametrize("feature_map,normalize", [("identity", "none"), ("elu", "sum"),
                                                   ("hedgehog", "sum")])
def test_a_retention_layer_at_init_is_the_attentions_linear_attention(parent_params,
                                                                      feature_map, normalize):
    model = L.hybrid_model(PARENT, (1,), "retention", [
        f"model.retention.feature_map={feature_map}", f"model.retention.normalize={normalize}",
        "model.retention.decay=none"])
    assert model.mixer_pattern == "ar" and not model.retention.gate
    attn = parent_params["blocks"][1]["mixer"]
    fresh = nnx.to_pure_dict(nnx.state(Retention(model, nnx.Rngs(1)), nnx.Param))
    params, mapped, dropped = L.initial_mixer(attn, fresh, PARENT, model, "retention")
    assert mapped == ["wq<-wq", "wk<-wk", "wv<-wv", "wo<-wo"] and dropped == []
    mixer = Retention(model, nnx.Rngs(2))
    state = nnx.state(mixer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mixer, state)
    x = 0.5 * jax.random.normal(jax.random.key(4), (2, 12, PARENT.d_model))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    got = mixer(x, pos, jnp.ones((2, 12), jnp.int32))[0]
    want = _by_hand(attn, x, feature_map, normalize)
    assert float(jnp.std(want)) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _retention_from(parent_params, layer, overrides, keep_window):
    model = L.hybrid_model(PARENT, (layer,), "retention", overrides, keep_window)
    fresh = nnx.to_pure_dict(nnx.state(Retention(model, nnx.Rngs(1)), nnx.Param))
    params, _, _ = L.initial_mixer(parent_params["blocks"][layer]["mixer"], fresh, PARENT,
                                   model, "retention")
    mixer = Retention(model, nnx.Rngs(2))
    state = nnx.state(mixer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mixer, state)
    return mixer


def test_with_a_window_covering_the_text_the_layer_is_the_attention_itself(parent_params):
    """--keep-window W >= T: every key is in the softmax window, so the new layer at init
    computes the parent's softmax attention exactly (the linear part sees nothing)."""
    from lm.model.mixers.attention import Attention
    attn = Attention(PARENT, nnx.Rngs(0))
    state = nnx.state(attn, nnx.Param)
    nnx.replace_by_pure_dict(state, parent_params["blocks"][0]["mixer"])
    nnx.update(attn, state)
    mixer = _retention_from(parent_params, 0, [], keep_window=16)
    x = jax.random.normal(jax.random.key(4), (2, 12, PARENT.d_model))
    pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
    want = attn(x, pos, seg)[0]
    assert float(jnp.std(want)) > 1e-3
    np.testing.assert_allclose(mixer(x, pos, seg)[0], want, rtol=1e-4, atol=1e-6)


def test_a_window_and_the_linear_part_share_one_normaliser(parent_params):
    """LoLCATs' hybrid by hand: keys in (t - W, t] by f exp(q.k / sqrt(d) - max), older
    ones by phi(q).phi(k) (Hedgehog at W = I, no decay), one denominator."""
    w, t = 3, 10
    mixer = _retention_from(parent_params, 1, ["model.retention.decay=none"], keep_window=w)
    attn = parent_params["blocks"][1]["mixer"]
    x = jax.random.normal(jax.random.key(5), (1, t, PARENT.d_model))
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    got = mixer(x, pos, jnp.ones((1, t), jnp.int32))[0]
    h = PARENT.n_heads

    def proj(name):
        y = jnp.einsum("btd,dhk->bthk", x, attn[name])
        return jnp.repeat(y, h // y.shape[2], axis=2)[0]

    q = rope(proj("wq")[None], pos, PARENT.rope_theta, PARENT.max_seq_len)[0]
    k = rope(proj("wk")[None], pos, PARENT.rope_theta, PARENT.max_seq_len)[0]
    v = proj("wv")

    def phi(z):
        return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)

    f = 0.5  # sigmoid(0): the window factor's start
    out = np.zeros((t, h, PARENT.dh))
    for i in range(t):
        for j in range(h):
            win = list(range(max(0, i - w + 1), i + 1))
            s = np.array([float(q[i, j] @ k[s_, j]) / np.sqrt(PARENT.dh) for s_ in win])
            a = f * np.exp(s - s.max())
            lin = np.array([float(phi(q[i, j]) @ phi(k[s_, j])) for s_ in range(0, i - w + 1)])
            num = sum(a_ * v[s_, j] for a_, s_ in zip(a, win)) + sum(
                l_ * v[s_, j] for l_, s_ in zip(lin, range(0, i - w + 1)))
            out[i, j] = num / (a.sum() + lin.sum())
    want = jnp.einsum("thk,hkd->td", out, attn["wo"])
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


def test_attention_transfer_lowers_each_layers_mse(parent_params):
    hybrid = L.build_hybrid(PARENT, parent_params, (0, 1), "retention")
    held_out = [_batch(1)]
    params, mse = L.transfer(PARENT, parent_params, hybrid, (0, 1),
                             (_batch(s) for s in itertools.count(10)), held_out, steps=12,
                             lr=1e-2, train="new", log=lambda *a: None)
    for layer in ("0", "1"):
        before, after = mse["before"][layer], mse["after"][layer]
        assert after["mse"] < 0.9 * before["mse"], mse
        assert 0 < after["relative"] < before["relative"]
    # "new" trains the feature maps only: the projections taken from attention stay.
    mixer = params["blocks"][0]["mixer"]
    np.testing.assert_array_equal(mixer["wo"], parent_params["blocks"][0]["mixer"]["wo"])
    assert float(jnp.abs(mixer["fq"] - jnp.eye(PARENT.dh)).max()) > 0
    # The rest of the model is the parent's.
    np.testing.assert_array_equal(params["blocks"][1]["channel"]["w_in"],
                                  parent_params["blocks"][1]["channel"]["w_in"])
    np.testing.assert_array_equal(params["embed"], parent_params["embed"])


@pytest.mark.parametrize("target,window", [("retention", 0), ("retention", 4), ("mamba2", 0)])
def test_the_linearized_models_cached_decode_equals_its_full_forward(parent_params, target,
                                                                     window):
    hybrid = L.build_hybrid(PARENT, parent_params, (0,), target, keep_window=window)
    cfg = hybrid.model
    assert cfg.retention.window == window
    assert cfg.mixer_pattern == ("ra" if target == "retention" else "ma")
    if target == "mamba2":  # state = head_dim, inner width = heads x head_dim: all mapped
        assert (cfg.mamba2.state, cfg.mamba2.expand) == (PARENT.dh, 1)
        assert "w_x<-wv" in hybrid.mapped[0][0] and "w_b<-mean_heads(wk)" in hybrid.mapped[0][0]
    model = _with_params(cfg, hybrid.params)
    x = _batch(5, t=20)["inputs"]
    full, _ = model(x)
    cache = model.init_cache(2, 32)
    logits, aux = model(x[:, :9], cache=cache, cache_index=0)
    np.testing.assert_allclose(logits, full[:, :9], rtol=1e-5, atol=1e-5)
    cache = aux["cache"]
    for t in range(9, 20):
        step, aux = model(x[:, t:t + 1], cache=cache, cache_index=t)
        cache = aux["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_a_scanned_parent_linearized_whole_stays_scanned(parent_params):
    scanned = dataclasses.replace(PARENT, scan_layers=True)
    stacked = L.stack_blocks(parent_params, scanned)
    hybrid = L.build_hybrid(scanned, stacked, (0, 1), "retention")
    assert hybrid.model.scan_layers and hybrid.model.mixer_pattern == "rr"
    want = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Transformer(hybrid.model, nnx.Rngs(0))), nnx.Param))
    got = L.stack_blocks(hybrid.params, hybrid.model)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    partial = L.build_hybrid(scanned, stacked, (1,), "retention")  # patterns differ
    assert not partial.model.scan_layers and partial.model.mixer_pattern == "ar"


def test_refusals_are_one_line_config_errors():
    hybrid = dataclasses.replace(PARENT, mixer_pattern="ar")
    with pytest.raises(ConfigError, match="layer 2 is out of range"):
        L.parse_layers(PARENT, "0,2")
    with pytest.raises(ConfigError, match="layer 1 is not an attention layer"):
        L.parse_layers(hybrid, "1")
    with pytest.raises(ConfigError, match="no attention layer"):
        L.parse_layers(dataclasses.replace(PARENT, mixer_pattern="r"), "")
    with pytest.raises(ConfigError, match="unknown target mixer"):
        L.hybrid_model(PARENT, (0,), "mlp")
    with pytest.raises(ConfigError, match="with --to retention only"):
        L.hybrid_model(PARENT, (0,), "mamba2", keep_window=4)
    with pytest.raises(ConfigError, match="only model"):
        L.hybrid_model(PARENT, (0,), "retention", ["steps=3"])
    with pytest.raises(ConfigError, match="normalize=sum needs positive features"):
        from lm.config import TrainConfig, validate
        validate(TrainConfig(model=L.hybrid_model(
            PARENT, (0,), "retention", ["model.retention.feature_map=identity"])))
    assert L.parse_layers(hybrid, "") == (0,)
