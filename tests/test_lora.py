"""LoRA: adapters on a frozen base (lm/peft/lora.py)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, lm, sets, train_losses
from flax import nnx
from test_finetune import instruction_file, tree_digest

from lm.config import DataConfig, LoRAConfig, ModelConfig, TrainConfig

TARGETS = "*.mixer.w[qkvo],*.channel.w_*"


def test_merged_weights_give_the_adapter_forward():
    from lm.peft.lora import LoRAModel, merged_params
    from lm.model import Transformer
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=32)
    lora = LoRAConfig(rank=3, alpha=6.0, targets=TARGETS)
    model = LoRAModel(cfg, lora, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # B starts at zero (the adapter is a no-op at init); make it nonzero.
    params["adapters"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape), params["adapters"])
    graphdef, _ = nnx.split(model)
    tokens = jnp.arange(24).reshape(2, 12) % 40
    with_adapters, _ = nnx.merge(graphdef, params)(tokens)
    plain_graph, _ = nnx.split(Transformer(cfg, nnx.Rngs(1)))
    merged, _ = nnx.merge(plain_graph, merged_params(cfg, lora, params))(tokens)
    without, _ = nnx.merge(plain_graph, params["base"])(tokens)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_adapters), atol=1e-5)
    assert float(jnp.abs(with_adapters - without).max()) > 1e-2  # the adapters matter


def test_only_adapters_have_optimizer_state_and_change():
    from lm.train.setup import setup_run
    from lm.data import train_iterator
    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
                      data=DataConfig(seq_len=32), batch_size=4, steps=10,
                      lora=LoRAConfig(rank=4, targets=TARGETS))
    run = setup_run(cfg)
    state = run.pieces.init_state()
    opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    adapters = sum(x.size for x in jax.tree.leaves(state["params"]["adapters"]))
    base = sum(x.size for x in jax.tree.leaves(state["params"]["base"]))
    assert 2 * adapters <= opt <= 2 * adapters + 8  # Adam's two moments (+ counters)
    assert adapters < base / 5
    base0 = jax.tree.map(np.asarray, state["params"]["base"])
    ad0 = jax.tree.map(np.asarray, state["params"]["adapters"])
    batch = run.pieces.global_batch(next(train_iterator(run.cfg.data, run.tokenizer, 4, 0)))
    step = run.pieces.train_step()
    for _ in range(3):
        state, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves(state["params"]["base"]), jax.tree.leaves(base0)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(float(np.abs(np.asarray(a) - b).max()) > 0
               for a, b in zip(jax.tree.leaves(state["params"]["adapters"]), jax.tree.leaves(ad0)))


def test_dylora_one_adapter_serves_every_rank():
    """Training calls draw a rank from 1..R per batch; at evaluation rank r uses the first
    r ranks (alpha / r), exactly what merging those ranks gives."""
    from lm.model import Transformer
    from lm.peft.lora import LoRAModel, merged_params
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)
    lora = LoRAConfig(rank=4, alpha=8.0, dylora=True, targets="*.mixer.w[qkvo]")
    model = LoRAModel(cfg, lora, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["adapters"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape), params["adapters"])
    graphdef, _ = nnx.split(model)
    drawn = {int(nnx.merge(graphdef, params).active_rank((jnp.arange(24).reshape(2, 12) * t) % 40))
             for t in range(1, 13)}
    assert drawn <= {1, 2, 3, 4} and len(drawn) >= 3, drawn
    plain, _ = nnx.split(Transformer(cfg, nnx.Rngs(1)))
    tokens = jnp.arange(24).reshape(2, 12) % 40
    outs = []
    for r in (1, 2, 4):
        at_r = dataclasses.replace(lora, eval_rank=r)
        g, _ = nnx.split(LoRAModel(cfg, at_r, nnx.Rngs(0)))
        got, _ = nnx.merge(g, params)(tokens)
        want, _ = nnx.merge(plain, merged_params(cfg, at_r, params))(tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        outs.append(np.asarray(got))
    assert np.abs(outs[0] - outs[2]).max() > 1e-3  # the ranks are different models


@pytest.mark.parametrize("overrides,message", [
    (["lora.rank=4", "lora.dropout=0.1"], "lora.dropout > 0 is not supported"),
    (["lora.rank=4", "lora.targets=*.nothing"], "matches no parameter"),
    (["lora.rank=-1"], "lora.rank must be >= 0"),
])
def test_bad_lora_config_is_one_line(tmp_path, lm_here, overrides, message):
    result = lm_here("train", "--run-dir", str(tmp_path / "r"), *sets(*TINY, *overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.slow
def test_lora_finetune_changes_only_adapters_and_exports_merged(tmp_path):
    """Base: an imported (swiglu, exportable) model; LoRA fine-tune on instruction
    records; the base run is only read, only adapters move, the loss falls; the export
    is the merged model, whose logits are the adapter model's."""
    from test_interop_hf import logits_of, write_hf_dir

    from lm.interop.hf_import import import_hf
    from lm.train.setup import restore_for_inference
    hf_dir, _ = write_hf_dir(tmp_path / "hf")
    base = tmp_path / "base"
    assert import_hf(hf_dir, base) == 0
    before = tree_digest(base / "checkpoints")
    rng = np.random.default_rng(0)
    records = [{"prompt": " ".join(f"w{i}" for i in rng.integers(0, 20, 6)),
                "response": " ".join(f"w{i}" for i in rng.integers(20, 40, 4))}
               for _ in range(64)]
    data = instruction_file(tmp_path / "sft.jsonl", records)
    run = tmp_path / "lora"
    result = lm("train", "--init-from", str(base), "--run-dir", str(run),
                *sets(*[o for o in TINY if not o.startswith("model.")],
                      f"data.corpus={data}", "data.format=instruction", "steps=16",
                      "lora.rank=4", "lora.alpha=8", f"lora.targets={TARGETS}",
                      "optim.lr=1e-2", "eval_every=100"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRA:" in result.stdout and "trainable params" in result.stdout
    losses = train_losses(run)
    assert losses[max(losses)] < losses[min(losses)] - 0.1, losses
    assert tree_digest(base / "checkpoints") == before  # the base run is only read
    ft_setup, ft, _ = restore_for_inference(run)
    _, src, _ = restore_for_inference(base)
    for a, b in zip(jax.tree.leaves(ft["base"]), jax.tree.leaves(src)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # only adapters moved
    from lm.cli import main
    assert main(["eval", "--run", str(run), "--lora-rank", "2", "--batches", "1"]) == 0
    assert main(["eval", "--run", str(run), "--lora-rank", "9", "--batches", "1"]) == 2
    out = lm("export", "hf", str(run), "--out", str(tmp_path / "out"))
    assert out.returncode == 0 and "LoRA adapters merged" in out.stdout, out.stderr[-2000:]
    assert import_hf(tmp_path / "out", tmp_path / "back") == 0
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 44
    want, _ = nnx.merge(ft_setup.pieces.graphdef, ft)(jnp.asarray(tokens))
    np.testing.assert_allclose(logits_of(tmp_path / "back", tokens), np.asarray(want),
                               atol=1e-4)
