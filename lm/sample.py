"""Autoregressive sampling with a KV cache: prefill the prompt once, then decode one
token at a time; temperature, top-k and top-p (nucleus) filtering; seeded. `complete`
(what `lm sample` calls) runs one prompt's samples through the batched engine (lm/infer)
where it can and falls back on `generate`, the loop here, for what the engine cannot do:
a generation longer than the model's context (the loop slides its window) or a model the
engine refuses. Many prompts go through the engine too (`lm generate`, the harness)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.infer import Engine, Request


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


CACHE_BUCKET = 128  # cache lengths are rounded up to this: few shapes, few compiles


@functools.lru_cache(maxsize=16)
def _steps(graphdef, temperature: float, top_k: int, top_p: float):
    """The jitted prefill and decode of a model, compiled once per (model, sampling
    settings, shapes) and reused across calls (a chat session, a benchmark). The cache is
    donated: each step updates it in place instead of copying every layer's K/V."""
    def step(params, tokens_BT, cache, index, key):
        logits, aux = nnx.merge(graphdef, params)(tokens_BT, cache=cache, cache_index=index)
        return choose(logits[:, -1], key, temperature, top_k, top_p), aux["cache"]

    return jax.jit(step, donate_argnums=(2,))


def cache_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """KV-cache slots for a generation: what it needs, rounded up to CACHE_BUCKET, at most
    max_seq_len. Decoding attends over every slot, so a cache of the model's whole context
    (8k for many real models) would cost a short reply ~60x the attention it needs."""
    need = prompt_len + max_new_tokens
    return min(max_seq_len, -(-need // CACHE_BUCKET) * CACHE_BUCKET)


def generate(graphdef, params, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_samples: int = 1, max_seq_len: int, stop_ids=(), timings: dict | None = None,
             done=None, check_every: int = 16):
    """Token ids of `num_samples` continuations of `prompt_ids` (prompt excluded), each
    cut before the first of `stop_ids` (a model's end-of-sequence ids: there may be
    several, e.g. Llama-3's <|end_of_text|> and <|eot_id|>).

    The KV cache holds what the generation needs (cache_length), at most `max_seq_len`
    tokens. A longer generation slides the window: when the cache is full, the last half
    of the text is prefilled into a fresh cache (the model never sees positions it was
    not built for). `timings`, if given, gets first_token_s (prompt to first token,
    compile included on a first call) and decode_s / decode_tokens (the rest).
    `done(rows)`, if given, is asked every `check_every` tokens with the ids generated so
    far (one list per sample) and ends the generation early when it says True (the
    harness's stop strings: a reply that stopped need not run to max_new_tokens)."""
    if not prompt_ids:
        raise ConfigError("the prompt must hold at least one token")
    model = nnx.merge(graphdef, params)
    step = _steps(graphdef, float(temperature), int(top_k), float(top_p))
    start = time.perf_counter()
    key = jax.random.PRNGKey(seed)
    text = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
    length = cache_length(len(prompt_ids), max_new_tokens, max_seq_len)
    keep = length if len(prompt_ids) <= length else length // 2
    produced, first = 0, None
    while produced < max_new_tokens:
        context = text[:, -keep:]
        cache = model.init_cache(num_samples, length)
        key, sub = jax.random.split(key)
        token, cache = step(params, context, cache, jnp.int32(0), sub)
        new = [token]
        produced += 1
        if first is None:
            if timings is not None:  # the first token's time, not its dispatch's
                jax.block_until_ready(token)
            first = time.perf_counter()
        index = context.shape[1]
        stopped = False
        while produced < max_new_tokens and index < length:
            if done is not None and produced % check_every == 0:
                so_far = jnp.concatenate([text, jnp.stack(new, axis=1)], axis=1)
                if done(jax.device_get(so_far[:, len(prompt_ids):]).tolist()):
                    stopped = True
                    break
            key, sub = jax.random.split(key)
            token, cache = step(params, token[:, None], cache, jnp.int32(index), sub)
            new.append(token)
            produced += 1
            index += 1
        text = jnp.concatenate([text, jnp.stack(new, axis=1)], axis=1)
        keep = length // 2
        if stopped:
            break
    rows = jax.device_get(text[:, len(prompt_ids):]).tolist()
    if timings is not None:
        end = time.perf_counter()
        timings.update(first_token_s=first - start, decode_s=end - first,
                       decode_tokens=num_samples * (produced - 1))
    stops = {int(i) for i in stop_ids}
    result = []
    for row in rows:
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:end])
    return result


def complete(graphdef, params, prompt_ids: list[int], max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_samples: int = 1, max_seq_len: int, stop_ids=()) -> list[list[int]]:
    """What `generate` returns (the ids of `num_samples` continuations, each cut before
    its first stop id), from the batched engine (lm/infer): one request of `num_samples`
    samples. The engine's pages are one per sample, `cache_length` tokens each: the
    cache `generate` would allocate, and one decode program (no page-table widths to
    compile as the text grows).

    Falls back on `generate` where the engine cannot do it: `prompt + max_new_tokens`
    beyond `max_seq_len` (the engine stops at the model's context; `generate` slides its
    window and keeps going) or a model the engine refuses (an MoE whose capacity drops
    tokens by batch). Greedy output is the same either way; sampled output follows the
    engine's keys (seed, sample index, token index), not `generate`'s split chain."""
    if not prompt_ids:
        raise ConfigError("the prompt must hold at least one token")
    if len(prompt_ids) + max_new_tokens <= max_seq_len:
        length = cache_length(len(prompt_ids), max_new_tokens, max_seq_len)
        try:
            engine = Engine(graphdef, params, slots=num_samples, pages=num_samples + 1,
                            page_size=length, max_seq_len=max_seq_len)
        except ConfigError:  # the engine refuses this model (init_slot_cache says why)
            engine = None
        if engine is not None:
            result, = engine.generate([Request(
                tuple(int(t) for t in prompt_ids), max_new_tokens=max_new_tokens,
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                seed=int(seed), stop_ids=tuple(int(i) for i in stop_ids), n=num_samples)])
            return [c.tokens for c in result.completions]
    return generate(graphdef, params, prompt_ids, max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, num_samples=num_samples,
                    max_seq_len=max_seq_len, stop_ids=stop_ids)
