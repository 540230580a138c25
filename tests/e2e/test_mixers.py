"""Sequence mixers beyond full attention: Mamba-2 and retention layers (parallel form ==
recurrent decoding, document isolation, they train), hybrid layer patterns, sliding
windows with sinks, and attention.impl=pallas against xla."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, lm, sets
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.model.mixers.attention import AttentionConfig
from lm.model.mixers.mamba2 import Mamba2Config
from lm.model.mixers.retention import RetentionConfig
from lm.sample import generate

# init_std 0.2: logits far from zero, so equalities below are not trivially true.
BASE = ModelConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=64,
                   mamba2=Mamba2Config(state=8, chunk=8), retention=RetentionConfig(chunk=8),
                   init_std=0.2)


def _forward(cfg, seed=0):
    model = Transformer(cfg, nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, *a, **kw: nnx.merge(graphdef, p)(*a, **kw))
    return model, (lambda *a, **kw: fn(params, *a, **kw))


def _tokens(b=2, t=20, seed=3):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 61)


@pytest.mark.parametrize("pattern,scan", [("m", False), ("r", True), ("mrma", False),
                                          ("m", True)])
def test_recurrent_decoding_equals_the_parallel_form(pattern, scan):
    cfg = dataclasses.replace(BASE, mixer_pattern=pattern, scan_layers=scan)
    model, forward = _forward(cfg)
    x = _tokens()
    full, _ = forward(x)
    assert float(jnp.std(full)) > 0.1
    cache = model.init_cache(2, 32)
    logits, aux = forward(x[:, :11], cache=cache, cache_index=0)  # prefill
    np.testing.assert_allclose(logits, full[:, :11], rtol=1e-5, atol=1e-5)
    cache = aux["cache"]
    for t in range(11, 20):  # one token at a time from the O(1) state
        step, aux = forward(x[:, t:t + 1], cache=cache, cache_index=t)
        cache = aux["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["m", "r"])
def test_packed_documents_do_not_exchange_state(pattern):
    """A row packing two documents gives each the logits it gets alone: the scan and
    Mamba-2's convolution both reset at the boundary."""
    _, forward = _forward(dataclasses.replace(BASE, mixer_pattern=pattern))
    a, b = _tokens(1, 13, seed=4), _tokens(1, 11, seed=5)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 13 + [2] * 11])
    pos = jnp.asarray([list(range(13)) + list(range(11))])
    got, _ = forward(packed, positions_BT=pos, segment_ids_BT=seg)
    alone_a, _ = forward(a)
    alone_b, _ = forward(b)
    np.testing.assert_allclose(got[:, :13], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 13:], alone_b, rtol=1e-5, atol=1e-5)


def test_greedy_sampling_of_a_hybrid_follows_the_full_forward():
    cfg = dataclasses.replace(BASE, mixer_pattern="mra")
    model, forward = _forward(cfg)
    graphdef, params = nnx.split(model)
    prompt = [5, 9, 2]
    out = generate(graphdef, nnx.to_pure_dict(params), prompt, 8, temperature=0.0,
                   max_seq_len=64)[0]
    seq = list(prompt)
    for _ in range(8):
        logits, _ = forward(jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]


def _packed_batch(b=2, t=40, seed=6):
    x = _tokens(b, t, seed)
    seg = jnp.asarray(np.repeat([[1] * 17 + [2] * 15 + [3] * 8], b, axis=0))
    pos = jnp.asarray(np.repeat([list(range(17)) + list(range(15)) + list(range(8))], b, 0))
    return x, pos, seg


@pytest.mark.parametrize("window,sinks,softcap", [(0, 0, 0.0), (6, 0, 0.0), (6, 2, 0.0),
                                                  (6, 2, 0.5)])
def test_pallas_attention_matches_xla_in_the_model(window, sinks, softcap):
    cfg = dataclasses.replace(BASE, n_layers=2, n_kv_heads=2, attention=AttentionConfig(
        impl="xla", window=window, sinks=sinks, softcap=softcap))
    x, pos, seg = _packed_batch()
    _, xla = _forward(cfg)
    _, pallas = _forward(_with_impl(cfg, "pallas"))
    want, aux_want = xla(x, positions_BT=pos, segment_ids_BT=seg)
    got, aux_got = pallas(x, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_got["attn_logit_max"], aux_want["attn_logit_max"], rtol=1e-5)
    if softcap:  # the cap bites: the logits it reports are capped, the output differs
        assert np.all(np.asarray(aux_got["attn_logit_max"]) <= softcap)
        uncapped, _ = _forward(dataclasses.replace(cfg, attention=dataclasses.replace(
            cfg.attention, softcap=0.0)))[1](x, positions_BT=pos, segment_ids_BT=seg)
        assert not np.allclose(uncapped, want, rtol=1e-5, atol=1e-5)


def _with_impl(cfg, impl):
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl=impl))


def test_window_limits_what_a_token_sees():
    """With window w, logits at t depend on tokens t-w+1..t (and sinks) only."""
    cfg = dataclasses.replace(BASE, n_layers=1, attention=AttentionConfig(window=4, sinks=1))
    _, forward = _forward(cfg)
    x = _tokens(1, 16)
    base, _ = forward(x)
    changed, _ = forward(x.at[:, 3].set((x[:, 3] + 1) % 61))  # token 3
    np.testing.assert_array_equal(base[:, :3], changed[:, :3])
    assert not np.allclose(base[:, 3:7], changed[:, 3:7])   # inside the window
    np.testing.assert_allclose(base[:, 7:], changed[:, 7:], rtol=1e-6, atol=1e-6)
    sink, _ = forward(x.at[:, 0].set((x[:, 0] + 1) % 61))  # token 0 is a sink
    assert not np.allclose(base[:, 10:], sink[:, 10:])


def _train_losses(cfg, steps=3):
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)
    x, pos, seg = _packed_batch(seed=8)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(x[:, :-1], positions_BT=pos[:, :-1],
                                               segment_ids_BT=seg[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt, loss

    opt, losses = tx.init(params), []
    for _ in range(steps):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    return losses


def test_training_with_pallas_attention_gives_the_xla_losses():
    cfg = dataclasses.replace(BASE, n_layers=2, n_kv_heads=2, init_std=0.02,
                              attention=AttentionConfig(window=8, sinks=2))
    xla = _train_losses(cfg)
    pallas = _train_losses(_with_impl(cfg, "pallas"))
    np.testing.assert_allclose(pallas, xla, rtol=1e-5)
    assert xla[-1] < xla[0]


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["m", "r"])
def test_recurrent_models_train_on_the_embedded_corpus(tmp_path, pattern):
    run = tmp_path / "run"
    result = lm("train", "--run-dir", str(run), *sets(
        *TINY, f"model.mixer_pattern={pattern}", "model.mamba2.state=16", "model.mamba2.chunk=16",
        "model.retention.chunk=16",
        "steps=40", "optim.lr=1e-2", "optim.warmup_steps=4", "eval_every=40",
        "checkpoint_every=40", "log_every=5"))
    assert result.returncode == 0, result.stderr[-2000:]
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
    assert not any(k.startswith("attn_logit_max") for k in train[-1])
    assert "resid_rms/1" in train[-1]
