"""The batched inference engine (lm/infer): continuous batching over paged K/V equals
one-at-a-time generation, a request's output does not depend on the batch, pages never
leak and a small pool is back-pressure, stops end a request early."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from lm.config import ModelConfig
from lm.errors import ConfigError
from lm.infer import Engine, Request
from lm.model import Transformer
from lm.model.mixers.attention import AttentionConfig
from lm.model.mixers.mamba2 import Mamba2Config
from lm.model.mixers.moe import MoEConfig
from lm.model.mixers.retention import RetentionConfig
from lm.sample import generate

# init_std 0.5: varied greedy continuations (a flat model repeats one token).
BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
            init_std=0.5)
MODELS = {
    "attention": {},
    "window_sinks": dict(attention=AttentionConfig(window=8, sinks=2, window_pattern="lg")),
    "hybrid": dict(mixer_pattern="ma", mamba2=Mamba2Config(state=8, chunk=8)),
    "retention_scanned": dict(mixer_pattern="r", scan_layers=True),  # slot axis 1
    # lm linearize --keep-window: a softmax window's K/V beside the state, per slot
    "retention_window": dict(mixer_pattern="ra", retention=RetentionConfig(
        chunk=8, feature_map="hedgehog", normalize="sum", gate=False, window=4)),
    "moe_scanned": dict(channel_pattern="e", scan_layers=True,
                        moe=MoEConfig(n_experts=4, top_k=2, ratio=2.0)),
}
PROMPTS = [[1, 2, 3], list(range(5, 25)), [7] * 9, [3, 4], list(range(30, 47))]


def _model(**kw):
    graphdef, params = nnx.split(Transformer(ModelConfig(**{**BASE, **kw}), nnx.Rngs(0)))
    return graphdef, nnx.to_pure_dict(params)


def _letters(ids):  # a stand-in tokenizer's decode: one letter per id
    return "".join(chr(ord("A") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def attention():
    return _model()


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_equals_one_at_a_time_generation_with_arrivals_mid_flight(kind):
    graphdef, params = _model(**MODELS[kind])
    want = [generate(graphdef, params, p, 12, temperature=0.0, max_seq_len=64)[0]
            for p in PROMPTS]
    engine = Engine(graphdef, params, slots=3, pages=40, page_size=4)
    for i in range(3):
        engine.submit(Request(tuple(PROMPTS[i]), max_new_tokens=12, id=i))
    got, streamed, late = {}, {i: [] for i in range(5)}, False
    for event in engine.run():
        if event.result is not None:
            got[event.id] = event.result.completions[0].tokens
        else:
            streamed[event.id].append(event.token)
        if not late and sum(map(len, streamed.values())) >= 7:  # others are decoding
            late = True
            for i in (3, 4):
                engine.submit(Request(tuple(PROMPTS[i]), max_new_tokens=12, id=i))
    assert [got[i] for i in range(5)] == want
    assert streamed == got  # every token was streamed, in order
    assert engine.pool.free == engine.pool.capacity and engine.idle
    jax.clear_caches()


def test_a_requests_output_does_not_depend_on_the_batch(attention):
    graphdef, params = attention
    mine = [Request((4, 9, 2, 11), max_new_tokens=10, seed=3, id="greedy"),
            Request((4, 9, 2, 11), max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9,
                    seed=3, n=2, id="sampled"),
            Request((4, 9, 2, 11), max_new_tokens=10, temperature=0.9, seed=4, id="plain")]
    others = [Request(tuple(p), max_new_tokens=6 + i, temperature=0.7 * (i % 2), seed=i)
              for i, p in enumerate(PROMPTS)]

    def tokens(requests):
        engine = Engine(graphdef, params, slots=4, pages=40, page_size=4)
        return {r.id: [c.tokens for c in r.completions]
                for r in engine.generate(requests) if isinstance(r.id, str)}

    # (alone, each batch takes another sampling branch: greedy, filtered, plain; steps.py)
    alone = {**tokens(mine[:1]), **tokens(mine[1:2]), **tokens(mine[2:])}
    mixed = tokens([others[0], mine[1], *others[1:3], mine[0], *others[3:], mine[2]])
    assert alone == mixed
    assert alone["sampled"][0] != alone["sampled"][1]  # n samples draw their own keys
    assert alone["greedy"][0] == generate(graphdef, params, [4, 9, 2, 11], 10,
                                          temperature=0.0, max_seq_len=64)[0]


def test_a_small_pool_is_back_pressure_and_no_page_leaks(attention):
    graphdef, params = attention
    requests = [Request(tuple(p), max_new_tokens=14) for p in PROMPTS]
    roomy = Engine(graphdef, params, slots=3, pages=64, page_size=4)
    want = [r.completions[0].tokens for r in roomy.generate(requests)]
    # 9 usable pages (36 tokens): three sequences of up to 31 tokens cannot all grow.
    tight = Engine(graphdef, params, slots=3, pages=10, page_size=4)
    assert [r.completions[0].tokens for r in tight.generate(requests)] == want
    assert tight.stats["preemptions"] > 0  # sequences waited and were resumed
    for engine in (roomy, tight):
        assert engine.pool.free == engine.pool.capacity and engine.idle
    with pytest.raises(ConfigError, match="pages"):  # could never fit: refused, not hung
        tight.submit(Request(tuple(range(30)), max_new_tokens=20))


def test_stop_ids_and_strings_end_a_request_early(attention):
    graphdef, params = attention
    prompt = tuple(range(5, 25))
    engine = Engine(graphdef, params, slots=2, pages=40, page_size=4, decode=_letters)
    full = engine.generate([Request(prompt, max_new_tokens=12)])[0].completions[0]
    assert full.finish_reason == "length" and len(full.tokens) == 12
    k = next(i for i in range(2, 12) if full.tokens[i] not in full.tokens[:i])
    by_id, by_text = engine.generate([
        Request(prompt, max_new_tokens=12, stop_ids=(full.tokens[k],)),
        Request(prompt, max_new_tokens=12, stop_strings=(_letters(full.tokens[k:k + 2]),))])
    c = by_id.completions[0]
    assert (c.tokens, c.finish_reason, c.text) == (full.tokens[:k], "stop",
                                                   _letters(full.tokens[:k]))
    stop = _letters(full.tokens[k:k + 2])
    cut = _letters(full.tokens).find(stop)  # (one letter per token; may come before k)
    c = by_text.completions[0]
    assert (c.tokens, c.finish_reason, c.text) == (full.tokens[:cut + 2], "stop",
                                                   _letters(full.tokens[:cut]))
    assert engine.pool.free == engine.pool.capacity


def test_the_engine_refuses_what_it_cannot_run(attention):
    graphdef, params = _model(channel_pattern="e", moe=MoEConfig(n_experts=4, top_k=2,
                                                                 capacity_factor=1.0))
    with pytest.raises(ConfigError, match="capacity_factor"):
        Engine(graphdef, params)
    engine = Engine(*attention, slots=1, pages=8)
    for bad in (Request(()), Request(tuple(range(64))), Request((1,), top_p=0.0),
                Request((1,), stop_strings=("x",))):  # (no decode for stop strings)
        with pytest.raises(ConfigError):
            engine.submit(bad)


def test_shared_prefixes_share_pages_and_change_no_output(attention):
    """Few-shot prompts with one 12-token head (3 pages of 4) and a request of n=3
    samples: with prefix sharing the later prompts take the head's pages instead of
    prefilling them, decode reads them Hydragen-style, prompts pack into shared rows;
    every combination gives the tokens of the plain engine (and of one-at-a-time greedy
    generation), and the pool drains to empty, index included."""
    graphdef, params = attention
    head = tuple(range(20, 32))
    tails = [(1, 2), (5,), (7, 8, 9, 10, 11), (3, 3, 3), (40, 41, 42, 43, 44, 45, 46)]
    requests = [Request(head + t, max_new_tokens=9, id=i) for i, t in enumerate(tails)]
    requests.append(Request(head + (6,), max_new_tokens=9, temperature=1.0, seed=5, n=3,
                            id="n3"))
    want = {i: [generate(graphdef, params, list(head + t), 9, temperature=0.0,
                         max_seq_len=64)[0]] for i, t in enumerate(tails)}

    def run(**kw):
        engine = Engine(graphdef, params, slots=4, pages=64, page_size=4, **kw)
        out = {r.id: [c.tokens for c in r.completions] for r in engine.generate(requests)}
        assert engine.pool.free == engine.pool.capacity and engine.pool.indexed == 0
        return out, engine.stats

    plain, plain_stats = run(share_prefixes=False, hydragen=False, pack_prefill=False)
    assert {i: plain[i] for i in want} == want
    # one prompt a row, every prompt fed whole
    assert plain_stats["prefill_rows"] == 8 and plain_stats["prefix_hit_tokens"] == 0
    for kw in (dict(hydragen=False), dict(), dict(pack_prefill=False)):
        got, stats = run(**kw)
        assert got == plain, kw
        assert stats["prefix_hit_tokens"] > 0 and stats["peak_pages"] < plain_stats["peak_pages"]
        assert (stats["hydragen_steps"] > 0) == kw.get("hydragen", True)
    _, packed = run()
    assert packed["prefill_rows"] < plain_stats["prefill_rows"]  # several prompts a row


def test_cancel_drops_a_request_and_frees_its_slots_and_pages(attention):
    """A cancelled request (some samples running, one queued) yields nothing more; its
    slots and pages go back, and the request beside it is unchanged."""
    graphdef, params = attention
    engine = Engine(graphdef, params, slots=2, pages=40, page_size=4)
    other = Request(tuple(PROMPTS[1]), max_new_tokens=10)
    want = engine.generate([other])[0].completions[0].tokens
    gone = engine.submit(Request(tuple(PROMPTS[0]), max_new_tokens=20, n=3))
    kept = engine.submit(other)
    engine.step()
    engine.step()
    assert engine.cancel(gone) and not engine.cancel(gone)
    events = list(engine.run())
    assert {e.id for e in events} == {kept}
    assert events[-1].result.completions[0].tokens == want
    assert engine.pool.free == engine.pool.capacity and engine.idle
    assert engine.stats["cancelled"] == 1


def test_a_lora_model_decodes_in_the_engine_as_one_at_a_time():
    from lm.peft.lora import LoRAConfig, LoRAModel
    model = LoRAModel(ModelConfig(**BASE), LoRAConfig(rank=4), nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    # Non-zero adapters (B starts at zero): the output must change with them.
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and 4 in x.shape else x, params)
    want = [generate(graphdef, params, p, 10, temperature=0.0, max_seq_len=64)[0]
            for p in PROMPTS[:3]]
    engine = Engine(graphdef, params, slots=2, pages=40, page_size=4)
    got = engine.generate([Request(tuple(p), max_new_tokens=10) for p in PROMPTS[:3]])
    assert [r.completions[0].tokens for r in got] == want
    base = Engine(*_model(), slots=2, pages=40, page_size=4).generate(
        [Request(tuple(PROMPTS[1]), max_new_tokens=10)])[0].completions[0].tokens
    assert base != want[1]  # the adapters are in the output


def test_keep_stop_keeps_the_stop_id_as_the_last_token(attention):
    graphdef, params = attention
    engine = Engine(graphdef, params, slots=2, pages=40, page_size=4)
    full = engine.generate([Request(tuple(PROMPTS[1]), max_new_tokens=12)])[0].completions[0]
    k = next(i for i in range(2, 12) if full.tokens[i] not in full.tokens[:i])
    kept, dropped = engine.generate([
        Request(tuple(PROMPTS[1]), max_new_tokens=12, stop_ids=(full.tokens[k],), keep_stop=keep)
        for keep in (True, False)])
    assert kept.completions[0].tokens == full.tokens[:k + 1]
    assert dropped.completions[0].tokens == full.tokens[:k]
    assert kept.completions[0].finish_reason == dropped.completions[0].finish_reason == "stop"
