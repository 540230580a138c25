"""Preference objectives (lm/post): DPO, SimPO and ORPO equal their hand-computed
formulas (loss and gradient), DPO of a pair with chosen = rejected is log 2 with zero
gradient, the reference gets no gradient, LoRA-DPO's reference is the run's own base
(no second copy), gradient accumulation keeps pairs together, and the pair data masks
the completions only and resumes its position."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from lm.config import resolve
from lm.data import load_tokenizer
from lm.model import Transformer
from lm.post.pairs import pair_iterator, read_pairs, PairRows
from lm.post.preference import Objective, PreferenceConfig, pair_losses, preference_stats
from lm.train.step import objective_sums


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_and_gradient_equal_the_hand_computed_case():
    cfg = PreferenceConfig(beta=0.5, label_smoothing=0.1)
    pi_c, pi_r, ref_c, ref_r = -3.0, -5.0, -4.0, -4.0  # h = 1 - (-1) = 2, beta h = 1

    def loss(pc, pr):
        return pair_losses("dpo", cfg, pc, pr, 1.0, 1.0, jnp.float32(ref_c),
                           jnp.float32(ref_r))[0]
    want = -0.9 * math.log(_sig(1.0)) - 0.1 * math.log(_sig(-1.0))
    assert float(loss(pi_c, pi_r)) == pytest.approx(want, rel=1e-6)
    # dL/dz = -0.9 (1 - sigma(z)) + 0.1 sigma(z) at z = 1; dz/dpi_c = beta = -dz/dpi_r
    dz = -0.9 * (1 - _sig(1.0)) + 0.1 * _sig(1.0)
    g_c, g_r = jax.grad(loss, argnums=(0, 1))(pi_c, pi_r)
    assert float(g_c) == pytest.approx(0.5 * dz, rel=1e-5)
    assert float(g_r) == pytest.approx(-0.5 * dz, rel=1e-5)
    assert float(pair_losses("dpo", cfg, pi_c, pi_r, 1.0, 1.0, ref_c, ref_r)[1]) == 1.0


def test_simpo_and_orpo_equal_their_formulas_on_masked_rows():
    # Two pairs of rows [4, 5]: per-token NLLs and response masks of different lengths.
    nll = np.array([[9, .5, 1., 2., 0], [9, 1., 1., 1., 1.],
                    [9, .2, .4, 0, 0], [9, 3., 0, 0, 0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1],
                     [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], np.float32)
    pi = -(nll * mask).sum(-1)
    n = mask.sum(-1)
    cfg = PreferenceConfig(beta=2.0, gamma=0.5, orpo_lambda=0.2)
    simpo = preference_stats("simpo", cfg, jnp.asarray(nll), jnp.asarray(mask), 2.0)
    losses, margins = [], []
    for c, r in ((0, 1), (2, 3)):
        z = 2.0 * (pi[c] / n[c] - pi[r] / n[r])
        losses.append(-math.log(_sig(z - 0.5)))
        margins.append(z)
    assert float(simpo["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(simpo["reward_margin"]) == pytest.approx(np.mean(margins), rel=1e-5)
    assert float(simpo["reward_accuracy"]) == np.mean([m > 0 for m in margins])
    summed = preference_stats("simpo", PreferenceConfig(beta=2.0, gamma=0.5,
                                                        length_normalize=False),
                              jnp.asarray(nll), jnp.asarray(mask), 2.0)
    want = np.mean([-math.log(_sig(2.0 * (pi[c] - pi[r]) - 0.5)) for c, r in ((0, 1), (2, 3))])
    assert float(summed["loss"]) == pytest.approx(want, rel=1e-5)

    orpo = preference_stats("orpo", cfg, jnp.asarray(nll), jnp.asarray(mask), 2.0)

    def log_odds(p):
        return math.log(math.exp(p) / (1 - math.exp(p)))
    want = []
    for c, r in ((0, 1), (2, 3)):
        pc, pr = pi[c] / n[c], pi[r] / n[r]
        want.append(-pc - 0.2 * math.log(_sig(log_odds(pc) - log_odds(pr))))
    assert float(orpo["loss"]) == pytest.approx(np.mean(want), rel=1e-5)
    assert float(orpo["logp_chosen"]) == pytest.approx(np.mean(pi[[0, 2]]), rel=1e-6)


def _cfg(*extra):
    return resolve("configs/default.py", TINY + ["model.vocab_size=259", *extra])


def _pairs(t, same=False, seed=0):
    """A batch of 2 pairs ([4, t] rows: 2i chosen, 2i + 1 rejected), a shared prompt of 5
    tokens then different (or, same=True, identical) completions."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 256, (4, t + 1))
    toks[1, :5], toks[3, :5] = toks[0, :5], toks[2, :5]
    if same:
        toks[1], toks[3] = toks[0], toks[2]
    mask = np.zeros((4, t), np.float32)
    mask[:, 4:] = 1.0  # the completion's targets
    return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
            "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (4, t)),
            "segment_ids": jnp.ones((4, t), jnp.int32), "loss_mask": jnp.asarray(mask)}


def _as_pairs(batch):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batch)


def test_dpo_of_identical_completions_is_log_2_with_zero_gradient_and_none_to_the_reference():
    cfg = _cfg()
    graphdef, params = nnx.split(Transformer(cfg.model, nnx.Rngs(params=0)), nnx.Param)
    _, ref = nnx.split(Transformer(cfg.model, nnx.Rngs(params=1)), nnx.Param)  # another model
    params, ref = nnx.to_pure_dict(params), nnx.to_pure_dict(ref)
    obj = Objective("dpo", PreferenceConfig(beta=0.3), "argument")

    def loss(p, r, batch):
        return objective_sums(graphdef, p, _as_pairs(batch), obj, 0.0, 1.0, 2.0, 0, r)[0]
    same = _pairs(cfg.data.seq_len, same=True)
    value, grads = jax.value_and_grad(loss)(params, ref, same)
    assert float(value) == pytest.approx(math.log(2), abs=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    # Different completions: a gradient for the policy, none for the reference.
    diff = _pairs(cfg.data.seq_len)
    g_policy = jax.grad(loss)(params, ref, diff)
    g_ref = jax.grad(loss, argnums=1)(params, ref, diff)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_policy)) > 1e-4
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_ref))
    # The reference equal to the policy: h = 0, the loss is log 2 for any pair.
    assert float(loss(params, params, diff)) == pytest.approx(math.log(2), abs=1e-6)


def test_lora_dpo_uses_its_own_base_as_the_reference_without_a_second_copy():
    from lm.post.reference import reference_for
    from lm.train.setup import setup_run
    dpo = setup_run(_cfg("lora.rank=4", "objective=dpo", "data.preferences=x.jsonl"))
    sft = setup_run(_cfg("lora.rank=4"))
    pieces = dpo.pieces
    assert reference_for(dpo) is None and pieces.objective().reference == "lora_base"

    def count(tree):
        return sum(x.size for x in jax.tree.leaves(tree))
    # The same train state as LoRA fine-tuning (one base, the adapters, their optimizer
    # state), and a step of (state, batch): no reference params anywhere.
    assert count(pieces.abstract_state()) == count(sft.pieces.abstract_state())
    compiled, _ = pieces.compile_train_step()
    n_args = len(jax.tree.leaves(compiled.args_info))
    assert n_args == len(jax.tree.leaves((pieces.abstract_state(), pieces.abstract_batch())))
    state = pieces.init_state()
    batch = pieces.global_batch({k: np.asarray(v) for k, v in _pairs(dpo.cfg.data.seq_len).items()})
    # The adapters start at zero: policy = base = reference, loss log 2; then, with
    # adapters, the reference log-probs stay the base's.
    step = pieces.train_step()
    s1, m1 = step(state, batch)
    assert float(m1["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m1["reward_margin"]) == pytest.approx(0.0, abs=1e-6)
    s2, m2 = step(s1, batch)
    s3, m3 = step(s2, batch)
    assert float(m3["loss"]) < math.log(2) and float(m3["reward_accuracy"]) == 1.0
    base = s3["params"]["base"]
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(pieces.init_state()["params"]["base"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base is frozen


def test_grad_accumulation_splits_by_pairs():
    from lm.train.setup import setup_run
    base = ["objective=simpo", "data.preferences=x.jsonl", "optim.clip_norm=0"]
    one, two = (setup_run(_cfg(*base, f"grad_accum={g}")) for g in (1, 2))
    batch = {k: np.array(v) for k, v in _pairs(one.cfg.data.seq_len).items()}
    batch["loss_mask"][2, 7:] = 0  # pairs of unequal token counts
    outs = []
    for run in (one, two):
        state = run.pieces.init_state()
        _, m = run.pieces.train_step()(state, run.pieces.global_batch(batch))
        outs.append((float(m["loss"]), float(m["reward_margin"]), float(m["grad_norm"])))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert outs[0][1] == pytest.approx(outs[1][1], abs=1e-6)
    assert outs[0][2] == pytest.approx(outs[1][2], rel=1e-4)  # the same gradient


def test_pairs_mask_the_completions_only_and_the_iterator_resumes(tmp_path):
    path = tmp_path / "p.jsonl"
    recs = [{"prompt": f"q{i}:", "chosen": "yes" + "!" * (4 * i), "rejected": "no"} for i in range(8)]
    recs.append({"messages": [{"role": "user", "content": "hi"}], "chosen": "hello",
                 "rejected": "go"})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = load_tokenizer("byte")
    rows = PairRows(read_pairs(str(path), "data.preferences"), tok, 32)
    item = rows[0]  # [2, T]: prompt "q0:" then "yes" / "no", EOS
    assert item["loss_mask"].shape == (2, 32)
    assert item["loss_mask"][0].sum() == len("yes") + 1 and item["loss_mask"][1].sum() == 3
    learned = item["targets"][0][item["loss_mask"][0] > 0]
    assert bytes(learned[:-1].tolist()) == b"yes" and learned[-1] == tok.eos_id
    assert bytes(item["inputs"][0][1:4].tolist()) == b"q0:"  # after BOS: the prompt, no loss
    chat = rows[8]  # no chat template (byte tokenizer): role-tagged lines
    assert bytes(chat["targets"][0][chat["loss_mask"][0] > 0][:-1].tolist()) == b"hello"
    long = rows[7]  # BOS "q7:" then 31 + EOS completion tokens, cut at the row's end
    assert long["loss_mask"][0].sum() == 32 - 3 and long["loss_mask"][1].sum() == 3

    class Data:  # what pair_iterator reads of a DataConfig
        preferences, validation_corpus, validation_fraction, seq_len = str(path), "", 0.2, 32
    it = pair_iterator(Data, tok, 4, seed=3)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = pair_iterator(Data, tok, 4, seed=3)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(3)]):
        assert a["inputs"].shape == (4, 32)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
