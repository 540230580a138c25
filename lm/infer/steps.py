"""The engine's two jitted programs: a batch-1 prefill of one sequence into its pages
(or its slot's recurrent state), and one decode step over every slot at once, with
fixed shapes (slots x pages per sequence, rounded up to a power of two) so that a run
compiles a handful of programs. Each slot samples with its own key, derived from
(request seed, sample index, token index): a row's tokens never depend on the others."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.paged import PagedKV


def _is_paged(x) -> bool:
    return isinstance(x, PagedKV)


def attach(cache, table, layers: int | None):
    """The stored cache with the step's page table in each PagedKV (broadcast over the
    layer axis when the layers are scanned: `layers`)."""
    if layers:
        table = jnp.broadcast_to(table, (layers, *table.shape))
    return jax.tree.map(lambda c: PagedKV(c.k, c.v, table) if _is_paged(c) else c, cache,
                        is_leaf=_is_paged)


def detach(cache):
    return jax.tree.map(lambda c: PagedKV(c.k, c.v) if _is_paged(c) else c, cache,
                        is_leaf=_is_paged)


def per_slot(cache, fn):
    """`fn(leaf)` on every per-slot state array (not the page pools)."""
    return jax.tree.map(lambda c: c if _is_paged(c) else jax.tree.map(fn, c), cache,
                        is_leaf=_is_paged)


def sample_row(logits_V, key, temperature, top_k, top_p):
    """One row's next token: greedy at temperature 0, else a draw from the temperature-
    scaled logits kept to the top-k and the top-p nucleus (lm.sample.filter_logits'
    rules, with the settings as traced values so rows may differ)."""
    greedy = jnp.argmax(logits_V).astype(jnp.int32)
    logits = logits_V / jnp.where(temperature > 0, temperature, 1.0)
    desc = jnp.sort(logits)[::-1]
    kth = desc[jnp.clip(top_k - 1, 0, logits.shape[0] - 1)]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    desc = jnp.sort(logits)[::-1]
    p = jax.nn.softmax(desc)
    keep = jnp.sum(jnp.cumsum(p) - p < top_p)
    threshold = desc[jnp.maximum(keep - 1, 0)]
    logits = jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)
    drawn = jax.random.categorical(key, logits).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def row_key(seed, sample, index):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), sample), index)


def _sample(logits_BV, sampling):
    """Each row's token. What the batch holds only picks the cheapest branch whose
    result is the same for every row: all greedy (argmax), no row filtered (no sorts),
    or the full filters (rows without filters pass through them unchanged)."""
    seed, sample, index, temperature, top_k, top_p = sampling
    keys = jax.vmap(row_key)(seed, sample, index)
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def plain(_):
        scaled = logits_BV / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    def filtered(_):
        return jax.vmap(sample_row)(logits_BV, keys, temperature, top_k, top_p)

    sampling_rows = temperature > 0
    any_filter = jnp.any(sampling_rows & ((top_k > 0) | (top_p < 1.0)))
    branch = jnp.where(jnp.any(sampling_rows), jnp.where(any_filter, 2, 1), 0)
    return jax.lax.switch(branch, [lambda _: greedy, plain, filtered], None)


@functools.lru_cache(maxsize=8)
def programs(graphdef, layers: int | None):
    """(prefill, decode) of a model; `layers`: the layer count when scanned (the slot
    axis of per-slot states is then axis 1), else None. The cache is donated."""
    axis = 1 if layers else 0

    def prefill(params, cache, tokens_1T, positions_1T, segments_1T, table_1M, slot, sampling):
        model = nnx.merge(graphdef, params)
        row = per_slot(cache, lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis))
        # A fresh sequence: its recurrent state starts at zero (the slot's old one is gone).
        row = per_slot(row, jnp.zeros_like)
        logits, aux = model(tokens_1T, positions_1T, segments_1T,
                            cache=attach(row, table_1M, layers), cache_index=0)
        new = detach(aux["cache"])
        merged = jax.tree.map(
            lambda old, n: n if _is_paged(old) else jax.tree.map(
                lambda o, x: jax.lax.dynamic_update_slice_in_dim(o, x.astype(o.dtype), slot,
                                                                 axis), old, n),
            cache, new, is_leaf=_is_paged)
        return _sample(logits[:, -1], sampling), merged

    def decode(params, cache, tokens_S, positions_S, active_S, table_SM, sampling):
        model = nnx.merge(graphdef, params)
        logits, aux = model(tokens_S[:, None], positions_S[:, None],
                            active_S[:, None].astype(jnp.int32),
                            cache=attach(cache, table_SM, layers), cache_index=0)
        new = detach(aux["cache"])

        def keep_idle(old, n):  # idle rows keep their state (their K/V went to the trash)
            shape = [1] * old.ndim
            shape[axis] = old.shape[axis]
            return jnp.where(active_S.reshape(shape), n.astype(old.dtype), old)

        merged = jax.tree.map(
            lambda old, n: n if _is_paged(old) else jax.tree.map(keep_idle, old, n),
            cache, new, is_leaf=_is_paged)
        return _sample(logits[:, 0], sampling), merged

    return (jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, donate_argnums=(1,)))
