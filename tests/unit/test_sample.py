"""Sampling filters and seeded generation with the KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.sample import filter_logits, generate


def test_top_k_keeps_exactly_k():
    logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 2, 1.0)))
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


def test_top_p_keeps_the_smallest_nucleus():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    kept = np.isfinite(np.asarray(filter_logits(jnp.log(probs), 1.0, 0, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(np.asarray(filter_logits(jnp.log(probs), 1.0, 0, 0.4)))
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_greedy_generation_follows_the_full_forward_argmax():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=64)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    prompt = [1, 7, 3, 9]
    out = generate(graphdef, params, prompt, 10, temperature=0.0, max_seq_len=64)[0]
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    seq = list(prompt)
    for _ in range(10):  # recompute every step without a cache; causal, so zero-padding
        logits = forward(params, jnp.array([seq + [0] * (14 - len(seq))]))  # is harmless
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert out == seq[len(prompt):]
    a = generate(graphdef, params, prompt, 10, temperature=1.0, seed=5, num_samples=3,
                 max_seq_len=64)
    b = generate(graphdef, params, prompt, 10, temperature=1.0, seed=5, num_samples=3,
                 max_seq_len=64)
    assert a == b and len(a) == 3
    jax.clear_caches()


def test_generation_longer_than_the_context_slides_the_window():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    out = generate(graphdef, nnx.to_pure_dict(params), [1, 2, 3], 40, temperature=0.0,
                   max_seq_len=16)[0]
    assert len(out) == 40 and all(0 <= t < 50 for t in out)
