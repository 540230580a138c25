"""Relaxed recursive transformers (lm/model/recursive.py): layers sharing blocks, with
per-layer LoRA relaxations; tying a trained untied model (averaged blocks, SVD
relaxations) and untying it back; parameter and FLOP counts; the CLI path from a
trained run (--init-from) to an exported plain model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_train_refused, lm, sets, train_losses
from flax import nnx

from lm.config import ModelConfig
from lm.model import Transformer, count_params, flops_per_token, recursive
from lm.model.recursive import Recursion

PARENT = dataclasses.replace(ModelConfig(), vocab_size=40, d_model=24, n_layers=4, n_heads=4,
                             n_kv_heads=2, head_dim=8, max_seq_len=32)


def with_params(cfg: ModelConfig, params: dict):
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def parent():
    """An untied model whose layers differ (random, and norm scales not all 1)."""
    model = Transformer(PARENT, nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, PARENT.vocab_size)
    return params, tokens, with_params(PARENT, params)(tokens)[0]


def test_layers_map_to_blocks_by_order():
    cycle = dataclasses.replace(PARENT, recursion=Recursion(blocks=2))
    seq = dataclasses.replace(PARENT, recursion=Recursion(blocks=2, order="sequence"))
    assert [recursive.block_of(cycle, i) for i in range(4)] == [0, 1, 0, 1]
    assert [recursive.block_of(seq, i) for i in range(4)] == [0, 0, 1, 1]
    model = Transformer(cycle, nnx.Rngs(0))
    assert len(model.blocks) == 2 and not hasattr(model, "relax")


@pytest.mark.parametrize("order", ["cycle", "sequence"])
def test_tying_averages_blocks_and_full_rank_relaxations_are_the_parent(parent, order):
    params, tokens, want = parent
    strict = dataclasses.replace(PARENT, recursion=Recursion(blocks=2, order=order))
    tied = recursive.tie(params, strict)
    for k in range(2):  # each shared block is the mean of the layers tied to it
        layers = [i for i in range(4) if recursive.block_of(strict, i) == k]
        np.testing.assert_allclose(
            tied["blocks"][k]["mixer"]["wq"],
            np.mean([params["blocks"][i]["mixer"]["wq"] for i in layers], axis=0), rtol=1e-6)
    strict_logits = with_params(strict, tied)(tokens)[0]
    assert float(jnp.abs(strict_logits - want).max()) > 1e-2  # tying changes the function
    # A rank at least every residual's own rank: the SVD relaxations restore each layer.
    full = dataclasses.replace(PARENT, recursion=Recursion(blocks=2, order=order, relax_rank=64))
    got = with_params(full, recursive.tie(params, full))(tokens)[0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    # A low rank lies in between (each layer's weights the best rank-4 approximation of
    # its own, Eckart-Young), and the recursive forward is its untied weights' forward.
    low = dataclasses.replace(PARENT, recursion=Recursion(blocks=2, order=order, relax_rank=4))
    low_params = recursive.tie(params, low)
    low_logits = with_params(low, low_params)(tokens)[0]
    untied = recursive.untie(low_params, low)
    assert jax.tree.structure(untied) == jax.tree.structure(params)

    def error(p):
        return sum(float(jnp.sum((p["blocks"][i]["mixer"]["wo"] - params["blocks"][i]["mixer"]["wo"]) ** 2))
                   for i in range(4))
    assert 0 < error(untied) < error(recursive.untie(tied, strict))
    np.testing.assert_allclose(with_params(PARENT, untied)(tokens)[0], low_logits, atol=1e-5)


def test_a_layer_alone_in_its_group_gets_a_trainable_relaxation(parent):
    """blocks = n_layers: no residual to decompose; A random, B zero (an all-zero pair
    would get no gradient)."""
    params, tokens, want = parent
    cfg = dataclasses.replace(PARENT, recursion=Recursion(blocks=4, relax_rank=2))
    tied = recursive.tie(params, cfg)
    ad = tied["relax"]["layers"][0]["mixer-wq"]
    assert float(jnp.abs(ad["a"]).max()) > 0 and float(jnp.abs(ad["b"]).max()) == 0
    np.testing.assert_allclose(with_params(cfg, tied)(tokens)[0], want, atol=1e-6)


def test_parameter_counts_are_stored_params_and_flops_the_untied_models():
    r = 4
    cfg = dataclasses.replace(PARENT, recursion=Recursion(blocks=2, relax_rank=r))
    parent_counts, counts = count_params(PARENT), count_params(cfg)
    block = Transformer(PARENT, nnx.Rngs(0)).blocks[0]
    per_block = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(block, nnx.Param)))
    d, h, kv, dh, ff = 24, 4, 2, 8, block.channel.w_in.shape[-1]
    # q, o, k, v, w_in, w_out low-rank; the two norm scales in full
    relax_per_layer = r * ((d + h * dh) * 2 + (d + kv * dh) * 2 + (d + ff) * 2) + 2 * d
    assert counts["total"] == parent_counts["total"] - 2 * per_block + 4 * relax_per_layer
    assert counts["non_embedding"] == counts["total"] - PARENT.vocab_size * d * 1
    assert flops_per_token(cfg, 16) == flops_per_token(PARENT, 16)
    assert "50% of the untied" in recursive.describe(
        dataclasses.replace(PARENT, d_model=64, n_heads=4, head_dim=16, n_kv_heads=4,
                            recursion=Recursion(blocks=2)))


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layers=4", "model.recursion.blocks=3"], "must divide model.n_layers=4"),
    (["model.recursion.relax_rank=2"], "needs model.recursion.blocks > 0"),
    (["model.n_layers=2", "model.mixer_pattern=am", "model.recursion.blocks=1"],
     "layer 1 would share block 0 with layer 0, but their mixers differ"),
    (["model.recursion.blocks=1", "model.scan_layers=true"], "needs model.scan_layers=false"),
    (["model.recursion.blocks=1", "lora.rank=2"], "train the model's own relaxations"),
])
def test_bad_recursion_configs_are_one_line(tmp_path, lm_here, overrides, message):
    assert_train_refused(lm_here, tmp_path / "r", overrides, message)


@pytest.mark.slow
def test_relaxed_recursive_model_from_a_trained_run(tmp_path):
    """A trained 4-layer run -> tied into 2 blocks (cycle) with rank-4 relaxations via
    --init-from: its starting loss (eval @ 0) is near the parent's and below strict
    sharing's; uptraining lowers it; at full rank it starts at exactly the parent's
    loss; `lm export hf` writes the untied model, whose logits are the recursive one's."""
    from lm.config import DataConfig, TrainConfig
    from lm.interop.families import model_config_from_hf
    from lm.interop.hf_import import load_params, read_hf_config
    from lm.train.param_source import restore_for_inference
    from lm.train.state import build
    model = ["model.n_layers=4", "model.mlp.activation=swiglu", "model.tie_embeddings=false"]
    base = tmp_path / "parent"
    result = lm("train", "--run-dir", str(base), *sets(*TINY, *model, "steps=40",
                                                       "eval_every=40", "optim.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-2000:]
    parent_loss = json.loads((base / "summary.json").read_text())["final_val_loss"]

    def child(name: str, steps: int, *recursion: str) -> dict[int, float]:
        run = tmp_path / name
        out = lm("train", "--init-from", str(base), "--run-dir", str(run),
                 *sets(*[o for o in TINY if not o.startswith("model.")], f"steps={steps}",
                       f"eval_every={steps}", "optim.lr=3e-3", *recursion))
        assert out.returncode == 0, out.stderr[-2000:]
        assert "recursion: 4 layers on 2 shared block(s)" in out.stdout
        return {json.loads(line)["step"]: json.loads(line)["loss"]
                for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "eval"}

    exact = child("full", 1, "model.recursion.blocks=2", "model.recursion.relax_rank=32")
    assert exact[0] == pytest.approx(parent_loss, abs=1e-5)
    strict = child("strict", 1, "model.recursion.blocks=2")
    relaxed = child("relaxed", 24, "model.recursion.blocks=2", "model.recursion.relax_rank=4")
    assert parent_loss < relaxed[0] < strict[0] < math.log(256), (parent_loss, relaxed, strict)
    assert relaxed[24] < relaxed[0] - 0.05, relaxed
    assert max(train_losses(tmp_path / "relaxed")) == 24

    out = lm("export", "hf", str(tmp_path / "relaxed"), "--out", str(tmp_path / "hf"))
    assert out.returncode == 0 and "recursion untied into 4 layers" in out.stdout, out.stderr
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["num_hidden_layers"] == 4
    # Read back as a plain model (the byte tokenizer has no tokenizer.json to import).
    cfg = TrainConfig(model=model_config_from_hf(read_hf_config(tmp_path / "hf")),
                      data=DataConfig(seq_len=16), batch_size=2)
    assert not cfg.model.recursion.blocks and cfg.model.n_layers == 4
    pieces = build(cfg)
    plain = nnx.merge(pieces.graphdef, load_params(tmp_path / "hf", cfg, pieces))
    setup, params, _ = restore_for_inference(tmp_path / "relaxed")
    tokens = jnp.asarray(np.arange(32, dtype=np.int32).reshape(2, 16) % 200)
    want = nnx.merge(setup.pieces.graphdef, params)(tokens)[0]
    np.testing.assert_allclose(plain(tokens)[0], want, atol=1e-5)


def test_hf_source_is_tied_on_load(tmp_path):
    """--init-from a Hugging Face directory with model.recursion set: the HF layers are
    loaded as the parent, then tied (full-rank relaxations reproduce its logits)."""
    from test_interop_hf import write_hf_dir

    from lm.config import DataConfig, TrainConfig, apply_overrides
    from lm.train.param_source import initial_state, with_source_model
    from lm.train.setup import setup_run
    hf_dir, model = write_hf_dir(tmp_path / "hf", n_layers=4)
    over = ["model.recursion.blocks=2", "model.recursion.order=sequence",
            "model.recursion.relax_rank=40"]
    cfg = dataclasses.replace(TrainConfig(), init_from=str(hf_dir), batch_size=2,
                              data=DataConfig(seq_len=16))
    cfg = apply_overrides(with_source_model(cfg, over), over)
    run = setup_run(cfg)
    state = initial_state(run.pieces)
    assert len(state["params"]["blocks"]) == 2
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 48
    got = nnx.merge(run.pieces.graphdef, state["params"])(jnp.asarray(tokens))[0]
    np.testing.assert_allclose(got, model(jnp.asarray(tokens))[0], atol=2e-5)


def test_recursive_model_trains_with_the_standard_step(tmp_path):
    """From scratch (no parent): shared blocks and relaxations all get gradients."""
    from lm.train.param_source import restore_for_inference
    run = tmp_path / "r"
    result = lm("train", "--run-dir", str(run), *sets(
        *TINY, "model.n_layers=4", "model.recursion.blocks=1", "model.recursion.relax_rank=2",
        "steps=8", "eval_every=8", "checkpoint_every=8"))
    assert result.returncode == 0, result.stderr[-2000:]
    _, params, step = restore_for_inference(run)
    assert step == 8
    assert float(jnp.abs(params["relax"]["layers"][3]["channel-w_in"]["b"]).max()) > 0
    losses = train_losses(run)
    assert losses[8] < losses[2]


def test_blocks_of_different_mixers_each_get_their_own_relaxations():
    """mixer_pattern "am" over 2 cycled blocks: block 0 attention, block 1 Mamba-2; each
    layer's relaxation covers its own block's parameters."""
    cfg = dataclasses.replace(PARENT, mixer_pattern="am",
                              recursion=Recursion(blocks=2, relax_rank=2))
    model = Transformer(cfg, nnx.Rngs(0))
    assert "mixer-wq" in model.relax.layers[0] and "mixer-wq" not in model.relax.layers[1]
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, PARENT.vocab_size)
    assert bool(jnp.all(jnp.isfinite(model(tokens)[0])))


def test_runs_from_before_mixers_declared_their_matrices_still_restore(tmp_path, lm_here):
    """Before mixers declared `adaptable`, a relaxation adapted the matrices named like
    attention's and the MLP's only (on Mamba-2 blocks: w_out). Such a run's config.json
    has no `recursion.relax`: it reads back as relax=attention_mlp, so its checkpoints
    (fewer adapters) restore for eval and sample; resuming it under the new default is
    one line naming the key to set."""
    from lm.config import from_dict, load_run_config, to_dict
    from lm.train.param_source import restore_for_inference
    mamba = dataclasses.replace(PARENT, mixer_pattern="m", n_layers=2,
                                recursion=Recursion(blocks=1, relax_rank=2))
    declared = Transformer(mamba, nnx.Rngs(0)).relax.layers[0]
    legacy = Transformer(dataclasses.replace(mamba, recursion=dataclasses.replace(
        mamba.recursion, relax="attention_mlp")), nnx.Rngs(0)).relax.layers[0]
    assert set(legacy) < set(declared) and "mixer-w_out" in legacy and "mixer-w_x" not in legacy

    run = tmp_path / "old"
    overrides = (*TINY, "model.mixer_pattern=m", "model.recursion.blocks=1",
                 "model.recursion.relax_rank=2", "steps=4", "checkpoint_every=4", "eval_every=4")
    result = lm("train", "--run-dir", str(run), *sets(*overrides, "model.recursion.relax=attention_mlp"))
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((run / "config.json").read_text())
    del written["model"]["recursion"]["relax"]  # as the code before `relax` wrote it
    (run / "config.json").write_text(json.dumps(written))
    assert load_run_config(run / "config.json").model.recursion.relax == "attention_mlp"
    assert from_dict(to_dict(load_run_config(run / "config.json"))).model.recursion.relax == "attention_mlp"
    _, params, step = restore_for_inference(run)
    assert step == 4 and set(params["relax"]["layers"][0]) == set(legacy)
    refused = lm_here("train", "--run-dir", str(run), *sets(*overrides))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "model.recursion.relax: 'attention_mlp' -> 'adaptable'" in refused.stderr
