"""Long-context evaluation: passkey prompts (deterministic by seed, exact lengths, the key
where the depth puts it), the exact scorer, the synthetic passkey corpus, eval-time
overrides (a Λ mask changes the loss past the window and nothing within it), KV-cache
decoding past the training length under the Λ mask, and `lm eval --lengths / --task
passkey` end to end on a tiny run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, sets
from flax import nnx

from lm.config import DataConfig, ModelConfig, TrainConfig
from lm.data import load_tokenizer, passkey
from lm.data.pipeline import packed_rows
from lm.evals.overrides import eval_time_config
from lm.evals.passkey import make_trials
from lm.model import Transformer

BYTES = load_tokenizer("byte")


def test_scorer_is_exact_on_constructed_outputs():
    assert passkey.score(" 71432.", "71432")
    assert passkey.score("71432", "71432")
    assert passkey.score(" 71432 is it", "71432")
    assert not passkey.score(" 7143.", "71432")  # too short
    assert not passkey.score(" 714329", "71432")  # too long
    assert not passkey.score(" 71433.", "71432")  # one digit off
    assert not passkey.score(" the key", "71432")  # no digits
    assert not passkey.score(" 12 71432", "71432")  # the first number counts


def test_passkey_trials_are_deterministic_by_seed_and_exactly_sized():
    a = make_trials(BYTES, 160, [0.0, 0.5, 1.0], 3, seed=7)
    b = make_trials(BYTES, 160, [0.0, 0.5, 1.0], 3, seed=7)
    c = make_trials(BYTES, 160, [0.0, 0.5, 1.0], 3, seed=8)
    assert [r["key"] for r in a] == [r["key"] for r in b] != [r["key"] for r in c]
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra["inputs"], rb["inputs"])
    where = {}
    for r in a:
        assert r["inputs"].shape == (160,) and r["targets"].shape == (160,)
        text = BYTES.decode(r["inputs"][1:].tolist())
        assert text.endswith(passkey.QUESTION + passkey.answer(r["key"])[:-1])
        assert BYTES.decode(r["targets"][-len(r["answer"]):].tolist()) == passkey.answer(r["key"])
        where.setdefault(r["depth"], []).append(text.index(passkey.needle(r["key"])))
    assert max(where[0.0]) == 0 < min(where[0.5]) <= max(where[0.5]) < min(where[1.0])


def test_passkey_corpus_is_deterministic_and_one_row_per_document():
    cfg = DataConfig(corpus="passkey", seq_len=96)
    rows = packed_rows(cfg, BYTES, "validation")
    assert len(rows) >= 1
    docs = passkey.documents("validation", 95)
    assert docs == passkey.documents("validation", 95) != passkey.documents("train", 95)[:len(docs)]
    assert max(len(d) for d in docs) <= 95  # BOS + text + EOS fits a row of 96 inputs
    keys = [d.split("The pass key is ")[1][:5] for d in docs]
    assert all(d.endswith(passkey.answer(k)) for d, k in zip(docs, keys))


def test_eval_time_overrides_keep_yarn_at_the_trained_length():
    cfg = TrainConfig(data=DataConfig(seq_len=64), model=ModelConfig(max_seq_len=64))
    out = eval_time_config(cfg, ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                                 "model.attention.window=32"], 256)
    assert out.data.seq_len == 256 and out.model.max_seq_len == 256
    assert out.model.rope_scaling.original_max_seq_len == 64
    assert out.model.attention.window == 32


def test_kv_cache_decoding_past_the_training_length_applies_the_lambda_mask():
    """Token-by-token decoding with the KV cache gives the full forward's logits under the
    same window + sinks, at positions far past the 16 the model was built for; and the
    mask matters there (the logits without it differ)."""
    base = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=16)
    params = nnx.to_pure_dict(nnx.split(Transformer(base, nnx.Rngs(0)))[1])
    long = dataclasses.replace(base, max_seq_len=64, attention=dataclasses.replace(
        base.attention, window=8, sinks=2))
    model = nnx.merge(nnx.split(Transformer(long, nnx.Rngs(0)))[0], params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 48), 0, 50)
    full = model(tokens)[0]
    prompt = 20  # already past the built-for length
    logits, aux = model(tokens[:, :prompt], cache=model.init_cache(1, 64), cache_index=0)
    steps = [logits]
    cache = aux["cache"]
    for i in range(prompt, 48):
        logits, aux = model(tokens[:, i:i + 1], cache=cache, cache_index=i)
        cache = aux["cache"]
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
    unmasked = dataclasses.replace(long, attention=base.attention)
    plain = nnx.merge(nnx.split(Transformer(unmasked, nnx.Rngs(0)))[0], params)(tokens)[0]
    assert float(jnp.max(jnp.abs(plain[:, 8:] - full[:, 8:]))) > 1e-3
    np.testing.assert_allclose(plain[:, :8], full[:, :8], atol=1e-5)  # within the window


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    """A tiny run trained a few steps on the passkey corpus (seq 96)."""
    from lm.cli import main
    run = tmp_path_factory.mktemp("pk") / "run"
    args = sets(*TINY, "data.corpus=passkey", "data.seq_len=96", "model.max_seq_len=96", "steps=4",
                "checkpoint_every=4", "eval_every=4")
    assert main(["train", "--run-dir", str(run), *args]) == 0
    return run


def test_lm_eval_lengths_reports_each_length_and_plots(passkey_run, tmp_path, lm_here):
    png, out = tmp_path / "curve.png", tmp_path / "lengths.json"
    r = lm_here("eval", "--run", str(passkey_run), "--lengths", "96,192", "--plot", str(png),
                "--json", str(out), "--batches", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["length"] for x in lines] == [96, 192] and all(x["tokens"] > 0 for x in lines)
    report = json.loads(out.read_text())
    assert len(report["lengths"][1]["curve"]) == 64 and png.stat().st_size > 1000
    # Λ mask at evaluation time: a window as long as the rows changes nothing; a short
    # one changes the loss of the long rows.
    same = lm_here("eval", "--run", str(passkey_run), "--lengths", "96", "--batches", "1",
                   "--set", "model.attention.window=96")
    lam = lm_here("eval", "--run", str(passkey_run), "--lengths", "192", "--batches", "1",
                  "--set", "model.attention.window=16", "--set", "model.attention.sinks=4")
    assert json.loads(same.stdout)["val_loss"] == pytest.approx(lines[0]["val_loss"], rel=1e-6)
    assert json.loads(lam.stdout)["val_loss"] != pytest.approx(lines[1]["val_loss"], rel=1e-6)


def test_lm_eval_passkey_grid_heatmap_and_determinism(passkey_run, tmp_path, lm_here):
    png = tmp_path / "pk.png"
    args = ("eval", "--run", str(passkey_run), "--task", "passkey", "--lengths", "96,128",
            "--depths", "0,1", "--trials", "3", "--seed", "1")
    r = lm_here(*args, "--plot", str(png))
    assert r.returncode == 0, r.stderr
    cells = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [(c["length"], c["depth"]) for c in cells] == [(96, 0.0), (96, 1.0), (128, 0.0), (128, 1.0)]
    assert all(c["trials"] == 3 and 0 <= c["accuracy"] <= 1 for c in cells)
    assert png.stat().st_size > 1000
    assert lm_here(*args).stdout == r.stdout


@pytest.mark.parametrize("args,message", [
    (["--lengths", "96,x"], "--lengths: expected comma-separated integers"),
    (["--lengths", "96", "--set", "model.d_model=64"], "not an evaluation-time knob"),
    (["--task", "passkey", "--depths", "2"], "--depths: expected fractions in [0, 1]"),
    (["--task", "passkey", "--lengths", "40"], "cannot build a passkey prompt of exactly 40"),
    (["--lengths", "96", "--set", "model.rope_scaling.type=linear",
      "--set", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor must be >= 1"),
])
def test_bad_eval_flags_exit_2_with_one_line(passkey_run, lm_here, args, message):
    r = lm_here("eval", "--run", str(passkey_run), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
