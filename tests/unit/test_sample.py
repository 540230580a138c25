"""Sampling filters and seeded generation with the KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.model.mixers.moe import MoEConfig
from lm.infer import Engine, Request
from lm.sample import complete, filter_logits, generate


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


def test_complete_is_the_engines_output_and_slides_only_past_the_context():
    """`complete` (what `lm sample` calls) is one engine request of n samples: its
    sampled tokens are the engine's for the seed (generate's split chain draws others),
    its greedy ones generate's; a generation that does not fit max_seq_len goes to
    generate, which slides its window, where the engine would stop at the context."""
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=64)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    prompt = [1, 7, 3, 9]
    got = complete(graphdef, params, prompt, 12, temperature=1.0, top_k=20, seed=5,
                   num_samples=3, max_seq_len=64, stop_ids=(4,))
    engine = Engine(graphdef, params, slots=2, pages=16, page_size=8)
    want = engine.generate([Request(tuple(prompt), max_new_tokens=12, temperature=1.0,
                                    top_k=20, seed=5, stop_ids=(4,), n=3)])[0]
    assert got == [c.tokens for c in want.completions] and len(got) == 3
    assert got != generate(graphdef, params, prompt, 12, temperature=1.0, top_k=20, seed=5,
                           num_samples=3, max_seq_len=64, stop_ids=(4,))
    assert complete(graphdef, params, prompt, 12, temperature=0.0, max_seq_len=64) == \
        generate(graphdef, params, prompt, 12, temperature=0.0, max_seq_len=64)
    long = complete(graphdef, params, prompt, 70, temperature=0.0, max_seq_len=64)
    assert len(long[0]) == 70
    assert long == generate(graphdef, params, prompt, 70, temperature=0.0, max_seq_len=64)
    jax.clear_caches()


def test_complete_falls_back_on_the_loop_for_a_model_the_engine_refuses():
    """An MoE whose capacity drops tokens by batch: the engine refuses it, so `complete`
    (lm sample) samples with the loop, whose draws it then equals."""
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                      channel_pattern="e", moe=MoEConfig(n_experts=4, top_k=2,
                                                         capacity_factor=1.0))
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    kw = dict(temperature=1.0, seed=2, num_samples=2, max_seq_len=32)
    assert complete(graphdef, params, [1, 2, 3], 6, **kw) == \
        generate(graphdef, params, [1, 2, 3], 6, **kw)
