"""Autoregressive sampling with a KV cache: prefill the prompt once, then decode one
token at a time; temperature, top-k and top-p (nucleus) filtering; seeded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
    """Logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if 0.0 < top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = jnp.sum(cum - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_BV, keep - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
    return logits_BV


def choose(logits_BV, key, temperature: float, top_k: int, top_p: float):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p))


def generate(graphdef, params, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_samples: int = 1, max_seq_len: int, stop_ids=()):
    """Token ids of `num_samples` continuations of `prompt_ids` (prompt excluded), each
    cut before the first of `stop_ids` (a model's end-of-sequence ids: there may be
    several, e.g. Llama-3's <|end_of_text|> and <|eot_id|>).

    The KV cache holds `max_seq_len` tokens. A longer generation slides the window:
    when the cache is full, the last half of the text is prefilled into a fresh cache
    (the model never sees positions it was not built for)."""
    if not prompt_ids:
        raise ConfigError("the prompt must hold at least one token")
    model = nnx.merge(graphdef, params)

    @jax.jit
    def prefill(params, tokens, cache, key):
        logits, aux = nnx.merge(graphdef, params)(tokens, cache=cache, cache_index=0)
        return choose(logits[:, -1], key, temperature, top_k, top_p), aux["cache"]

    @jax.jit
    def decode(params, token_B, cache, index, key):
        logits, aux = nnx.merge(graphdef, params)(token_B[:, None], cache=cache,
                                                  cache_index=index)
        return choose(logits[:, -1], key, temperature, top_k, top_p), aux["cache"]

    key = jax.random.PRNGKey(seed)
    text = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
    keep = max_seq_len if len(prompt_ids) <= max_seq_len else max_seq_len // 2
    produced = 0
    while produced < max_new_tokens:
        context = text[:, -keep:]
        cache = model.init_cache(num_samples, max_seq_len)
        key, sub = jax.random.split(key)
        token, cache = prefill(params, context, cache, sub)
        text = jnp.concatenate([text, token[:, None]], axis=1)
        produced += 1
        index = context.shape[1]
        while produced < max_new_tokens and index < max_seq_len:
            key, sub = jax.random.split(key)
            token, cache = decode(params, token, cache, jnp.int32(index), sub)
            text = jnp.concatenate([text, token[:, None]], axis=1)
            produced += 1
            index += 1
        keep = max_seq_len // 2
    stops = {int(i) for i in stop_ids}
    result = []
    for row in jax.device_get(text[:, len(prompt_ids):]).tolist():
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:end])
    return result
