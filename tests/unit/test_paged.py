"""Paged attention (lm/model/paged.py) against ordinary attention: the in-row, own-page
and shared-prefix (Hydragen) parts combined by log-sum-exp equal one softmax over the
whole sequence, with GQA, windows, sinks and the soft cap; a packed prefill equals a
padded one; a model decoding through pages gives the logits of its full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer
from lm.model.mixers.attention import AttentionConfig
from lm.model.paged import TRASH_PAGE, PagedKV, PageStep, attend

PS = 4  # page size


def _dense(q_HD, k_SKD, v_SKD, q_pos, scale, window, sinks, softcap):
    """One query over its whole sequence's keys (positions 0..S-1), plain softmax."""
    h, kv = q_HD.shape[0], k_SKD.shape[1]
    k = jnp.repeat(k_SKD, h // kv, axis=1)
    v = jnp.repeat(v_SKD, h // kv, axis=1)
    s = jnp.einsum("hd,shd->hs", q_HD, k) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    pos = jnp.arange(k.shape[0])
    ok = pos <= q_pos
    if window:
        ok &= (q_pos - pos < window) | (pos < sinks)
    p = jax.nn.softmax(jnp.where(ok[None], s, -jnp.inf), axis=-1)
    return jnp.einsum("hs,shd->hd", p, v)


def _step(**kw):
    z = np.zeros
    base = dict(write_page=z((1, 1), np.int32), read_table=z((1, 0), np.int32),
                read_from=z((1,), np.int32), group=np.full((1, 1), -1, np.int32),
                group_table=z((0, 0), np.int32), group_len=z((0,), np.int32))
    return PageStep(**{**base, **kw})


CASES = {"mha": dict(h=4, kv=4), "gqa": dict(h=4, kv=2),
         "window_sinks": dict(h=4, kv=2, window=5, sinks=2),
         "softcap_window": dict(h=4, kv=1, window=7, softcap=2.0)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hydragen", [False, True])
def test_decode_through_pages_equals_dense_attention(case, hydragen):
    c = {"window": 0, "sinks": 0, "softcap": 0.0, **CASES[case]}
    h, kv, dh, scale = c["h"], c["kv"], 8, 0.35
    rng = np.random.default_rng(0)
    # Sequences 0 and 1 share a 3-page prefix (the same physical pages); 2 has none.
    lengths, shared = [17, 14, 9], 3 * PS
    prefix_k = rng.normal(size=(shared, kv, dh)).astype(np.float32)
    prefix_v = rng.normal(size=(shared, kv, dh)).astype(np.float32)
    pool = np.zeros((40, PS, 2 * kv, dh), np.float32)
    next_page, tables, keys = [1, 2, 3], [], []
    page = 4
    for i, n in enumerate(lengths):
        k = rng.normal(size=(n + 1, kv, dh)).astype(np.float32)
        v = rng.normal(size=(n + 1, kv, dh)).astype(np.float32)
        table = []
        if i < 2:
            k[:shared], v[:shared] = prefix_k, prefix_v
            table = list(next_page)
        while len(table) * PS < n + 1:
            table.append(page)
            page += 1
        for p in range(n):  # the cached keys (position n is fed this step)
            pool[table[p // PS], p % PS, 0::2], pool[table[p // PS], p % PS, 1::2] = k[p], v[p]
        tables.append(table)
        keys.append((k, v))
    q = rng.normal(size=(3, 1, h, dh)).astype(np.float32)
    pos = np.asarray(lengths, np.int32)[:, None]
    new_k = np.stack([k[n] for (k, _), n in zip(keys, lengths)])[:, None]
    new_v = np.stack([v[n] for (_, v), n in zip(keys, lengths)])[:, None]
    write = np.asarray([[t[n // PS]] for t, n in zip(tables, lengths)], np.int32)
    if hydragen:
        skip = [3, 3, 0]
        group = np.asarray([[0], [0], [-1]], np.int32)
        gt, gl = np.asarray([[1, 2, 3, 0]], np.int32), np.asarray([shared, 0], np.int32)[:1]
    else:
        skip, group = [0, 0, 0], np.full((3, 1), -1, np.int32)
        gt, gl = np.zeros((0, 0), np.int32), np.zeros((0,), np.int32)
    read = np.full((3, 8), TRASH_PAGE, np.int32)
    for i, (t, n) in enumerate(zip(tables, lengths)):
        own = t[skip[i]:-(-n // PS)]
        read[i, :len(own)] = own
    step = _step(write_page=write, read_table=read, read_from=np.asarray(skip) * PS,
                 group=group, group_table=gt, group_len=gl)
    out, new, _ = attend(jnp.asarray(q), jnp.asarray(new_k), jnp.asarray(new_v),
                         jnp.asarray(pos), jnp.ones((3, 1), jnp.int32),
                         PagedKV(jnp.asarray(pool), step), scale=scale,
                         window=c["window"], sinks=c["sinks"], softcap=c["softcap"])
    for i, ((k, v), n) in enumerate(zip(keys, lengths)):
        want = _dense(q[i, 0], k, v, n, scale, c["window"], c["sinks"], c["softcap"])
        np.testing.assert_allclose(out[i, 0], want, atol=1e-5, rtol=1e-5)
        # The fed token's K/V went to its page (keys at even, values at odd heads).
        np.testing.assert_array_equal(new.kv[write[i, 0], n % PS, 0::2], k[n])
        np.testing.assert_array_equal(new.kv[write[i, 0], n % PS, 1::2], v[n])


BASE = dict(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
            init_std=0.5)


def _prefill_steps(model, prompts, packed: bool, shared: int = 0):
    """Prefill `prompts` through pages, packed in one row or one a row (left-padded).
    With `shared` > 0 every prompt after the first starts with the first's `shared`
    tokens (whole pages) and reads them from its pages instead of feeding them.
    Returns (last-token logits per prompt, cache, page tables)."""
    cache = model.init_slot_cache(1, 64, PS)
    tables, page = [], 1
    for i, p in enumerate(prompts):
        own = list(tables[0][:shared // PS]) if i and shared else []
        while len(own) * PS < len(p):
            own.append(page)
            page += 1
        tables.append(own)
    starts = [shared if i else 0 for i in range(len(prompts))]
    fed = [len(p) - s for p, s in zip(prompts, starts)]
    t = 64 if packed else max(fed)
    rows = 1 if packed else len(prompts)
    tok, pos, seg, write = (np.zeros((rows, t), np.int32) for _ in range(4))
    group = np.full((rows, t), -1, np.int32)
    col, last = 0, []
    for i, (p, s, n) in enumerate(zip(prompts, starts, fed)):
        r = 0 if packed else i
        c = col if packed else t - n
        span = slice(c, c + n)
        tok[r, span], pos[r, span] = p[s:], np.arange(s, len(p))
        seg[r, span] = i + 1 if packed else 1
        write[r, span] = np.asarray(tables[i])[np.arange(s, len(p)) // PS]
        if s:
            group[r, span] = 0
        last.append(r * t + c + n - 1)
        col += n if packed else 0
    gt = np.asarray([tables[0][:shared // PS]], np.int32) if shared else np.zeros((0, 0), np.int32)
    gl = np.asarray([shared], np.int32) if shared else np.zeros((0,), np.int32)
    step = PageStep(write, np.zeros((rows, 0), np.int32), np.zeros((rows,), np.int32), group,
                    gt, gl)
    attached = [PagedKV(c.kv, step) for c in cache]
    hidden, aux = model.hidden_states(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(seg),
                                      cache=attached, cache_index=0)
    logits = model.readout(hidden.reshape(-1, hidden.shape[-1])[jnp.asarray(last)][None])[0]
    return logits, [PagedKV(c.kv) for c in aux["cache"]], tables


@pytest.mark.parametrize("kw", [{}, dict(attention=AttentionConfig(window=6, sinks=1))],
                         ids=["attention", "window_sinks"])
def test_packed_prefill_equals_padded_and_the_full_forward(kw):
    model = Transformer(ModelConfig(**{**BASE, **kw}), nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 53, n)) for n in (13, 5, 20)]
    packed, cache_p, tables = _prefill_steps(model, prompts, packed=True)
    padded, cache_q, _ = _prefill_steps(model, prompts, packed=False)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=1e-5)
    for i, p in enumerate(prompts):
        full, _ = model(jnp.asarray([p]))
        np.testing.assert_allclose(packed[i], full[0, -1], atol=1e-5, rtol=1e-5)
        for a, b in zip(cache_p, cache_q):  # the same K/V in the same pages
            np.testing.assert_allclose(a.kv[np.asarray(tables[i])], b.kv[np.asarray(tables[i])],
                                       atol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(attention=AttentionConfig(window=6, sinks=1)),
                                dict(n_kv_heads=4)], ids=["gqa", "window_sinks", "mha"])
def test_shared_prefix_prefill_and_hydragen_decode_give_the_full_forwards_logits(kw):
    """Three prompts share an 8-token prefix: the later two read it from the first's
    pages in the same packed prefill, then one decode step runs with and without the
    Hydragen group; every logit equals the model's full forward over the sequence."""
    model = Transformer(ModelConfig(**{**BASE, **kw}), nnx.Rngs(0))
    rng = np.random.default_rng(2)
    head = list(rng.integers(1, 53, 8))
    prompts = [head + list(rng.integers(1, 53, n)) for n in (5, 3, 9)]
    logits, cache, tables = _prefill_steps(model, prompts, packed=True, shared=8)
    for i, p in enumerate(prompts):
        full, _ = model(jnp.asarray([p]))
        np.testing.assert_allclose(logits[i], full[0, -1], atol=1e-5, rtol=1e-5)
    nxt = [int(jnp.argmax(x)) for x in logits]
    n = [len(p) for p in prompts]
    write = np.asarray([[t[m // PS] if m // PS < len(t) else 60 + i]
                        for i, (t, m) in enumerate(zip(tables, n))], np.int32)
    results = []
    for hydragen in (False, True):
        skip = 2 if hydragen else 0
        read = np.zeros((3, 8), np.int32)
        for i, t in enumerate(tables):
            own = t[skip:-(-n[i] // PS)]
            read[i, :len(own)] = own
        step = PageStep(write, read, np.full((3,), skip * PS, np.int32),
                        np.full((3, 1), 0 if hydragen else -1, np.int32),
                        np.asarray([tables[0][:2]], np.int32) if hydragen
                        else np.zeros((0, 0), np.int32),
                        np.asarray([8], np.int32) if hydragen else np.zeros((0,), np.int32))
        out, _ = model(jnp.asarray(nxt)[:, None], jnp.asarray(n)[:, None],
                       jnp.ones((3, 1), jnp.int32), cache=[PagedKV(c.kv, step) for c in cache],
                       cache_index=0)
        results.append(out[:, 0])
        for i, p in enumerate(prompts):
            full, _ = model(jnp.asarray([p + [nxt[i]]]))
            np.testing.assert_allclose(out[i, 0], full[0, -1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=1e-5)
