"""Pruning (lm/compress/prune.py) against references: a model with a sublayer's output
zeroed equals the depth-pruned model without it (every norm placement); pruned heads /
MLP units / embedding channels equal the parent with those masked; a sublayer or head
that does nothing scores lowest; the removed-sublayer mixer ("-") decodes with the KV
cache and the engine exactly as its full forward computes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ModelConfig, TrainConfig
from lm.compress import prune as P
from lm.infer import Engine, Request
from lm.model import Transformer, count_params, mixers
from lm.model.mixers.mlp import MLPConfig
from lm.sample import generate

BASE = dict(vocab_size=53, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
            init_std=0.2, mlp=MLPConfig(activation="swiglu", ratio=2.0))


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
        Transformer(cfg, nnx.Rngs(seed)), nnx.Param)))


def _logits(cfg: ModelConfig, params: dict, tokens) -> np.ndarray:
    graphdef = P._graphdef(cfg)
    return np.asarray(nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(tokens)[0])


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 16)))


def _perturb_norms(params: dict, rng) -> dict:
    """Norm scales and biases away from 1 / 0 (a zeroed LayerNorm output would otherwise
    hide a missing bias)."""
    out: dict = {}
    for path, v in P.leaf_paths(params):
        if path[-1] in ("scale", "bias"):
            v = v + rng.normal(0, 0.3, v.shape).astype(v.dtype)
        P.set_path(out, path, v)
    return out


@pytest.mark.parametrize("layout", [
    dict(), dict(norm_position="peri", norm="layer"), dict(norm_position="post"),
    dict(parallel_block=True), dict(norm_position="out", norm="layer")])
def test_a_zeroed_sublayer_equals_the_model_without_it(layout):
    cfg = ModelConfig(**{**BASE, **layout})
    params = _perturb_norms(_params(cfg), np.random.default_rng(1))
    removed = [(1, "mixer"), (2, "channel"), (0, "channel")]
    zero = params
    for layer, slot in removed:
        zero = P.zeroed(cfg, zero, layer, slot)
    small = P.depth_model(cfg, removed)
    assert (small.mixer_pattern, small.channel_pattern) == ("a-a", "-f-")
    pruned = P.subset_params(small, params)
    np.testing.assert_allclose(_logits(small, pruned, TOKENS), _logits(cfg, zero, TOKENS),
                               atol=1e-5, rtol=1e-5)
    # The removed sublayers' parameters and their own norms are gone from the model.
    counts = count_params(small)["total"]
    assert counts == sum(v.size for _, v in P.leaf_paths(pruned)) < count_params(cfg)["total"]
    # FLOPs: the attention scores of the removed attention layer are gone too.
    assert mixers.extra_flops_per_token(small, 16) == pytest.approx(
        mixers.extra_flops_per_token(cfg, 16) * 2 / 3)
    if layout.get("norm_position", "pre") == "pre" and not layout.get("parallel_block"):
        assert "norm1" not in pruned["blocks"][1] and "norm2" not in pruned["blocks"][2]


def _batches(n: int = 2) -> list[dict]:
    rng = np.random.default_rng(2)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 53, (2, 17))
        out.append({"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                    "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
                    "segment_ids": jnp.ones((2, 16), jnp.int32),
                    "loss_mask": jnp.ones((2, 16), jnp.float32)})
    return out


def _parent(cfg: ModelConfig, params: dict) -> P.Parent:
    return P.Parent(run=None, step=0, cfg=TrainConfig(model=cfg), params=params,
                    tokenizer=None)


def test_depth_scores_rank_a_sublayer_that_does_nothing_lowest_and_remove_it():
    cfg = ModelConfig(**BASE)
    params = P.zeroed(cfg, _params(cfg), 1, "channel")  # layer 1's MLP adds nothing
    scores = P.depth_scores(_parent(cfg, params), _batches())
    assert len(scores) == 6
    lowest = min(scores, key=lambda s: s["kl"])
    assert (lowest["layer"], lowest["slot"], lowest["kl"]) == (1, "channel", 0.0)
    assert all(s["kl"] > 1e-6 for s in scores if s is not lowest)
    pruned = P.prune_depth(_parent(cfg, params), _batches(), {"remove": 1})
    assert pruned.model.channel_pattern == "f-f" and pruned.model.mixer_pattern == "aaa"
    only = P.prune_depth(_parent(cfg, params), _batches(), {"remove": 1, "only": "attention"})
    assert only.model.channel_pattern == "fff" and only.model.mixer_pattern.count("-") == 1


def _masked(cfg, params, heads_gone, kv_gone, units_gone, channels_gone) -> dict:
    """The parent with pruned heads' and units' outputs zeroed (wo rows, w_out columns),
    and pruned embedding channels zero wherever they enter the residual stream."""
    p = jax.tree.map(np.array, params)
    g = cfg.n_heads // cfg.kv_heads
    for i in range(cfg.n_layers):
        b = p["blocks"][i]
        gone = set(heads_gone) | {k * g + j for k in kv_gone for j in range(g)}
        for h in gone:
            b["mixer"]["wo"][h] = 0
        b["channel"]["w_out"][:, units_gone] = 0
        b["mixer"]["wo"][..., channels_gone] = 0
        b["channel"]["w_out"][channels_gone] = 0
    p["embed"][:, channels_gone] = 0
    return p


def _keep(n, gone):
    return np.asarray([i for i in range(n) if i not in gone])


@pytest.mark.parametrize("what", ["heads", "kv_groups", "mlp", "d_model"])
def test_width_pruning_equals_the_parent_with_those_masked(what):
    cfg = ModelConfig(**BASE)
    params = _perturb_norms(_params(cfg), np.random.default_rng(3))
    heads, kv, units, chans = [], [], [], []
    if what == "heads":
        heads = [1, 2]  # one query head of each KV group
    elif what == "kv_groups":
        kv = [0]
    elif what == "mlp":
        units = [0, 5, 9, 63]
    else:
        chans = [3, 4, 17, 30]
    parent = _masked(cfg, params, heads, kv, units, chans)
    g = cfg.n_heads // cfg.kv_heads
    q = _keep(cfg.n_heads, set(heads) | {k * g + j for k in kv for j in range(g)})
    per_layer = {"heads": [q] * 3, "kv_heads": [_keep(cfg.kv_heads, kv)] * 3,
                 "mlp": [_keep(64, units)] * 3}
    keep = {"embed": _keep(32, chans)}
    small = P.width_model(cfg, {"d_model": len(keep["embed"]), "heads": len(q),
                                "kv_heads": len(per_layer["kv_heads"][0]),
                                "ffn": len(per_layer["mlp"][0])})
    pruned = P.slice_params(cfg, parent, keep, per_layer)
    # RMSNorm's mean over d_model: exact up to norm_eps's share (see slice_params).
    tol = 1e-4 if what == "d_model" else 1e-5
    np.testing.assert_allclose(_logits(small, pruned, TOKENS), _logits(cfg, parent, TOKENS),
                               atol=tol, rtol=tol)


def test_width_importance_ranks_a_silent_head_and_unit_lowest():
    cfg = ModelConfig(**BASE)
    params = jax.tree.map(np.array, _params(cfg))
    params["blocks"][0]["mixer"]["wv"][:, 1] = 0  # KV head 1: its query heads 2, 3 read zeros
    params["blocks"][2]["channel"]["w_in"][:, 7] = 0  # SwiGLU unit 7: gate * 0
    imp = P.width_importance(_parent(cfg, params), _batches())
    assert imp["heads"].shape == (3, 4) and imp["mlp"].shape == (3, 64)
    assert imp["embed"].shape == (32,)
    np.testing.assert_allclose(imp["heads"][0, 2:], 0, atol=1e-6)
    assert imp["heads"][0, :2].min() > 1e-3
    assert imp["mlp"][2].argmin() == 7 and imp["mlp"][2, 7] == 0
    q, groups = P.keep_heads(imp["heads"][0], 2, 2, 1)
    assert list(groups) == [0] and list(q) == [0, 1]
    pruned = P.prune_width(_parent(cfg, params), _batches(), {"kv_heads": 1, "heads": 2,
                                                              "ffn": 48})
    assert (pruned.model.n_heads, pruned.model.kv_heads, pruned.model.mlp.d_ff(32)) == (2, 1, 48)
    assert 7 not in pruned.report["kept"]["mlp"][2]


def test_fraction_rule_and_refusals():
    cfg = ModelConfig(**BASE)
    for fraction in (0.3, 0.5):
        t = P.width_targets(cfg, {"fraction": fraction})
        assert (t["heads"], t["kv_heads"], t["d_model"]) == (2, 2, 32)  # whole groups kept
        small = P.width_model(cfg, t)
        ratio = count_params(small)["non_embedding"] / count_params(cfg)["non_embedding"]
        assert ratio == pytest.approx(1 - fraction, abs=0.01)
    mha = dataclasses.replace(cfg, n_kv_heads=0)
    assert P.width_targets(mha, {"fraction": 0.5})["kv_heads"] == 2  # MHA: whole heads
    from lm.errors import ConfigError
    for bad, message in [({"heads": 8}, "larger than"), ({"heads": 3}, "multiple"),
                         ({"heads": 4, "kv_heads": 1}, "query heads per group"),
                         ({"d_model": 32}, "the target is the model")]:
        with pytest.raises(ConfigError, match=message):
            P.width_targets(cfg, bad)


def test_the_removed_sublayer_decodes_as_its_full_forward():
    cfg = ModelConfig(**{**BASE, "mixer_pattern": "a-a", "channel_pattern": "f-f",
                         "init_std": 0.5})
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    prompt = [1, 7, 3, 9]
    out = generate(graphdef, params, prompt, 8, temperature=0.0, max_seq_len=32)[0]
    seq = list(prompt)
    for _ in range(8):  # the full forward, no cache
        logits = nnx.merge(graphdef, params)(jnp.array([seq]))[0]
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]
    engine = Engine(graphdef, params, slots=2, pages=16, page_size=4)
    engine.submit(Request(tuple(prompt), max_new_tokens=8, id=0))
    got = [e.result.completions[0].tokens for e in engine.run() if e.result is not None]
    assert got == [out]
    jax.clear_caches()
