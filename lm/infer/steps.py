"""The engine's two jitted programs: a prefill of several prompts at once (packed several
to a row with segment ids, or one to a row, left-padded), and one decode step over every
slot at once. Shapes are bucketed to powers of two (rows, row length, sequences, page
table widths, prefix groups) so that a run compiles a handful of programs. Each sequence
samples with its own key, derived from (request seed, sample index, token index)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.paged import PagedKV, PageStep


def _is_paged(x) -> bool:
    return isinstance(x, PagedKV)


def attach(cache, step: PageStep, layers: int | None):
    """The stored cache with the step's PageStep in each PagedKV (broadcast over the
    layer axis when the layers are scanned: `layers`)."""
    if layers:
        step = jax.tree.map(lambda x: jnp.broadcast_to(x, (layers, *x.shape)), step)
    return jax.tree.map(lambda c: PagedKV(c.kv, step) if _is_paged(c) else c, cache,
                        is_leaf=_is_paged)


def detach(cache):
    return jax.tree.map(lambda c: PagedKV(c.kv) if _is_paged(c) else c, cache,
                        is_leaf=_is_paged)


def per_slot(cache, fn):
    """`fn(leaf)` on every per-slot state array (not the page pools)."""
    return jax.tree.map(lambda c: c if _is_paged(c) else jax.tree.map(fn, c), cache,
                        is_leaf=_is_paged)


def has_slot_state(cache) -> bool:
    """Whether the model keeps a recurrent state per slot (Mamba-2, retention layers)."""
    leaves = jax.tree.leaves(per_slot(cache, lambda x: x), is_leaf=_is_paged)
    return any(not _is_paged(x) for x in leaves)


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

    def prefill(params, cache, tokens_RT, positions_RT, segments_RT, step, slots_R, last_N,
                sampling):
        """slots_R: the slot of each row's sequence (rows of recurrent models hold one
        sequence each; a padding row's slot is out of range: its state is dropped);
        last_N: the flat index of each sequence's last prompt token."""
        model = nnx.merge(graphdef, params)
        # Fresh sequences: their recurrent state starts at zero (the slot's old one is gone).
        rows = per_slot(cache, lambda x: jnp.zeros(
            (*x.shape[:axis], slots_R.shape[0], *x.shape[axis + 1:]), x.dtype))
        hidden, aux = model.hidden_states(tokens_RT, positions_RT, segments_RT,
                                          cache=attach(rows, step, layers), cache_index=0)
        last = hidden.reshape(-1, hidden.shape[-1])[last_N]
        logits = model.readout(last[None])[0]
        new = detach(aux["cache"])

        def put(old, n):  # the rows' states back into their slots
            idx = [slice(None)] * old.ndim
            idx[axis] = slots_R
            return old.at[tuple(idx)].set(n.astype(old.dtype), mode="drop")

        merged = jax.tree.map(
            lambda old, n: n if _is_paged(old) else jax.tree.map(put, old, n),
            cache, new, is_leaf=_is_paged)
        return _sample(logits, sampling), merged

    def decode(params, cache, tokens_S, positions_S, active_S, step, sampling):
        model = nnx.merge(graphdef, params)
        logits, aux = model(tokens_S[:, None], positions_S[:, None],
                            active_S[:, None].astype(jnp.int32),
                            cache=attach(cache, step, layers), cache_index=0)
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
