"""LoRA: adapters on a frozen base (lm/peft/lora.py)."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, lm, sets, train_losses
from flax import nnx
from test_finetune import instruction_file, tree_digest

from lm.config import DataConfig, LoRAConfig, ModelConfig, TrainConfig

TARGETS = "*.mixer.w[qkvo],*.channel.w_*"


def _merged_adapter_and_base_logits(cfg, lora, lora_model):
    """Logits of (the adapters merged into the weights, the adapter model, the base alone)
    on fixed tokens, with B made nonzero (it starts at zero: a no-op adapter at init)."""
    from lm.model import Transformer
    from lm.peft.lora import merged_params
    params = nnx.to_pure_dict(nnx.state(lora_model, nnx.Param))
    params["adapters"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape), params["adapters"])
    graphdef, _ = nnx.split(lora_model)
    tokens = jnp.arange(24).reshape(2, 12) % 40
    with_adapters, _ = nnx.merge(graphdef, params)(tokens)
    plain, _ = nnx.split(Transformer(cfg, nnx.Rngs(1)))
    merged, _ = nnx.merge(plain, merged_params(cfg, lora, params))(tokens)
    without, _ = nnx.merge(plain, params["base"])(tokens)
    return merged, with_adapters, without


def test_merged_weights_give_the_adapter_forward():
    from lm.peft.lora import LoRAModel
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=32)
    lora = LoRAConfig(rank=3, alpha=6.0, targets=TARGETS)
    merged, with_adapters, without = _merged_adapter_and_base_logits(
        cfg, lora, LoRAModel(cfg, lora, nnx.Rngs(0)))
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_adapters), atol=1e-5)
    assert float(jnp.abs(with_adapters - without).max()) > 1e-2  # the adapters matter


@pytest.mark.parametrize("moe", [False, True])
def test_only_adapters_have_optimizer_state_and_change(moe):
    """Dense, and MoE (every other layer, with the rule-based balancing bias on): the
    base, router and its bias included, stays frozen."""
    from lm.train.setup import setup_run
    from lm.data import train_iterator
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    targets = TARGETS
    if moe:
        model = dataclasses.replace(model, channel_pattern="fe", moe=dataclasses.replace(
            model.moe, n_experts=4, top_k=2, bias_rate=1e-2))
        targets = "*.mixer.w[qkvo],blocks.0.channel.w_*"  # experts (stacked) are not adapted
    cfg = TrainConfig(model=model, data=DataConfig(seq_len=32), batch_size=4, steps=10,
                      lora=LoRAConfig(rank=4, targets=targets))
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


@pytest.mark.parametrize("pattern,targets,adapted", [
    ("m", "*.mixer.w_*", {"w_z", "w_x", "w_b", "w_c", "w_dt", "w_out"}),
    ("r", "*.mixer.w?", {"wq", "wk", "wv", "wg", "wo"}),
])
def test_lora_adapts_and_trains_mamba2_and_retention_projections(pattern, targets, adapted):
    """The matrices a mixer declares adaptable are LoRA targets (Mamba-2's w_z .. w_out,
    retention's gate wg too: once refused or unknown to LoRA's own tables): the adapter
    changes the forward pass, its merged weights give the same logits, and a few steps
    move the adapters and only them."""
    from lm.data import train_iterator
    from lm.peft.lora import LoRAModel
    from lm.train.setup import setup_run
    model = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                        mixer_pattern=pattern)
    lora = LoRAConfig(rank=2, alpha=4.0, targets=targets)
    lm_model = LoRAModel(model, lora, nnx.Rngs(0))
    assert {p[-1] for p in lm_model.targets} == adapted
    assert len(lm_model.targets) == 2 * len(adapted)  # every layer's
    merged, with_adapters, without = _merged_adapter_and_base_logits(model, lora, lm_model)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_adapters), atol=1e-5)
    assert float(jnp.abs(with_adapters - without).max()) > 1e-3

    cfg = TrainConfig(model=dataclasses.replace(model, vocab_size=0), batch_size=4, steps=10,
                      data=DataConfig(seq_len=32), lora=lora)
    run = setup_run(cfg)
    state = run.pieces.init_state()
    base0 = jax.tree.map(np.asarray, state["params"]["base"])
    ad0 = jax.tree.map(np.asarray, state["params"]["adapters"])
    batch = run.pieces.global_batch(next(train_iterator(run.cfg.data, run.tokenizer, 4, 0)))
    step = run.pieces.train_step()
    for _ in range(3):
        state, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves(state["params"]["base"]), jax.tree.leaves(base0)):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = {k for k, v in state["params"]["adapters"].items()
             if float(np.abs(np.asarray(v["b"]) - ad0[k]["b"]).max()) > 0}
    assert {k.split("-")[-1] for k in moved} == adapted


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
    (["lora.rank=4", "model.channel_pattern=e", "lora.targets=*.channel.w_in"],
     "is not a weight LoRA adapts here"),  # stacked experts
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
    from lm.train.param_source import restore_for_inference
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


def _stored(step_dir, prefix=()):
    """From a checkpoint's tree metadata: {path: shape} of the train state's arrays as
    orbax wrote them, and their bytes (all 4-byte dtypes here) under `prefix`."""
    meta = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
    shapes = {tuple(k["key"] for k in v["key_metadata"]): v["value_metadata"]["write_shape"]
              for v in meta.values() if "write_shape" in v["value_metadata"]}
    return shapes, sum(4 * int(np.prod(s)) for p, s in shapes.items() if p[:len(prefix)] == prefix)


def _one_error_line(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_and_a_pinned_reference_to_the_base(
        tiny_run, tmp_path, lm_here):
    """A LoRA fine-tune of a run: its checkpoints hold no base array, lora_base.json pins
    the source's checkpoint step; a resume rebuilds the base from it and reproduces the
    uninterrupted run; lm eval gives the training-end val loss. The base gone (the
    source moved, its pinned step deleted, the reference deleted): exit 2, one line, and
    the run's checkpoints stay as they were (none renamed aside as unreadable)."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_run, base)  # the session's run is shared: move a copy around
    args = sets(*TINY, "log_every=1", "lora.rank=4", "optim.lr=1e-2")

    def train(run, env=None):
        return lm("train", "--init-from", str(base), "--run-dir", str(run), *args, env=env)

    full, run = tmp_path / "full", tmp_path / "lora"
    assert train(full).returncode == 0
    first = train(run, env={"LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 143, first.stderr[-2000:]
    assert json.loads((run / "lora_base.json").read_text()) == {
        "kind": "run", "path": str(base), "step": 12}  # the source's newest, pinned
    shapes, data = _stored(run / "checkpoints" / "6")
    assert not [p for p in shapes if p[:2] == ("params", "base")]
    assert [p for p in shapes if p[:2] == ("params", "adapters")]
    assert {p[0] for p in shapes} == {"params", "opt_state", "step", "rng"}
    _, base_bytes = _stored(base / "checkpoints" / "12", ("params",))
    assert data < base_bytes / 4, (data, base_bytes)  # adapters, their Adam moments, step

    def untouched():
        return sorted(p.name for p in (run / "checkpoints").iterdir())
    before = untouched()
    step12 = base / "checkpoints" / "12"
    shutil.move(step12, tmp_path / "12")  # the source trained on: keep_checkpoints dropped it
    resume = train(run)
    _one_error_line(resume, "checkpoint step 12 of", str(base), "is gone")
    _one_error_line(lm_here("eval", "--run", str(run), "--batches", "1"), "is gone")
    assert untouched() == before and not (run / "summary.json").read_text().count("completed")
    shutil.move(tmp_path / "12", step12)
    base.rename(tmp_path / "moved")
    _one_error_line(lm_here("eval", "--run", str(run), "--batches", "1"), str(base), "is gone")
    _one_error_line(train(run), str(base))  # (its config is read first: no config.json there)
    (run / "lora_base.json").rename(tmp_path / "ref")
    _one_error_line(lm_here("eval", "--run", str(run), "--batches", "1"),
                    "lora_base.json is missing")
    assert untouched() == before
    (tmp_path / "moved").rename(base)
    (tmp_path / "ref").rename(run / "lora_base.json")

    again = train(run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 6" in again.stdout and "initialised from" not in again.stdout
    a, b = train_losses(full), train_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-6)
    result = lm_here("eval", "--run", str(run), "--batches", "2")  # TINY's eval_batches
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    want = json.loads((run / "summary.json").read_text())["final_val_loss"]
    assert got["step"] == 12 and abs(got["val_loss"] - want) < 1e-6, (got, want)


@pytest.mark.slow
def test_lora_base_of_a_hugging_face_dir_is_fingerprinted(tmp_path, lm_here):
    """init_from an HF dir: lora_base.json names it with a fingerprint of its
    safetensors files; lm eval rebuilds the base from it, and refuses in one line once a
    file changed (same size, other values)."""
    from safetensors.numpy import load_file, save_file
    from test_interop_hf import write_hf_dir
    hf_dir, _ = write_hf_dir(tmp_path / "hf")
    run = tmp_path / "lora"
    result = lm("train", "--init-from", str(hf_dir), "--run-dir", str(run),
                *sets(*[o for o in TINY if not o.startswith("model.")], "steps=4",
                      "eval_every=4", "lora.rank=2", "optim.lr=1e-2"))
    assert result.returncode == 0, result.stderr[-2000:]
    ref = json.loads((run / "lora_base.json").read_text())
    files = sorted(hf_dir.glob("*.safetensors"))
    assert ref["kind"] == "hf" and ref["path"] == str(hf_dir)
    assert [(f["name"], f["bytes"]) for f in ref["files"]] == [
        (f.name, f.stat().st_size) for f in files]
    shapes, _ = _stored(run / "checkpoints" / "4")
    assert not [p for p in shapes if p[:2] == ("params", "base")]
    ok = lm_here("eval", "--run", str(run), "--batches", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    got = json.loads(ok.stdout.strip().splitlines()[-1])["val_loss"]
    assert abs(got - json.loads((run / "summary.json").read_text())["final_val_loss"]) < 1e-6
    tensors = load_file(files[0])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.5  # another fine-tune of the same architecture
    save_file(tensors, files[0])
    assert files[0].stat().st_size == ref["files"][0]["bytes"]
    _one_error_line(lm_here("eval", "--run", str(run), "--batches", "1"), files[0].name,
                    "changed since the run started")
    assert (run / "checkpoints" / "4").is_dir()


def test_lora_run_of_its_own_init_rebuilds_the_base_and_older_checkpoints_restore(tmp_path):
    """No init_from: lora_base.json records the seed and a restore recomputes the base,
    bit for bit the run's init. A checkpoint written before this change (the whole
    state, base included; no lora_base.json) restores as it is."""
    import shutil

    from lm.config import to_json
    from lm.interop.hf_import import save_state
    from lm.train.param_source import checkpoint_layout, restore_for_inference
    from lm.train.setup import setup_run
    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
                      data=DataConfig(seq_len=32), batch_size=4, steps=4,
                      lora=LoRAConfig(rank=4, targets=TARGETS))
    run = setup_run(cfg)
    state = run.pieces.init_state()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(to_json(run.cfg))
    save_state(old, state, step=3)
    _, params, step = restore_for_inference(old)
    assert step == 3 and not (old / "lora_base.json").exists()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    new = tmp_path / "new"
    shutil.copytree(old, new)
    shutil.rmtree(new / "checkpoints")
    layout = checkpoint_layout(new, run.pieces)
    fresh = layout.start()  # what lm train does at a first start
    assert json.loads((new / "lora_base.json").read_text()) == {"kind": "init", "seed": 0}
    save_state(new, layout.saved(fresh), step=2)  # what Checkpointer(layout=).save writes
    shapes, _ = _stored(new / "checkpoints" / "2")
    assert not [p for p in shapes if p[:2] == ("params", "base")]
    _, params, step = restore_for_inference(new)
    assert step == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_lora_run_written_by_77d21ee_evaluates_samples_and_resumes(tmp_path, lm_here):
    """A LoRA run of its own init as lmlab wrote it at 77d21ee (tests/fixtures/
    lora_run_77d21ee, recipe.sh: stopped by SIGTERM at step 4 of 8; its checkpoint holds
    the adapters only, lora_base.json {"kind": "init", "seed": 0}): lm eval gives the val
    loss it recorded, lm sample the greedy text 77d21ee sampled, and lm train resumes it
    and reproduces the losses of the uninterrupted run 77d21ee wrote."""
    from pathlib import Path
    fixture = Path(__file__).parent.parent / "fixtures" / "lora_run_77d21ee"
    run = tmp_path / "lora"
    with tarfile.open(fixture / "run.tar.gz") as tar:  # the run dir as 77d21ee wrote it
        tar.extractall(tmp_path, filter="data")
    (tmp_path / "run").rename(run)
    want = json.loads((fixture / "uninterrupted.json").read_text())
    assert json.loads((run / "lora_base.json").read_text()) == {"kind": "init", "seed": 0}
    shapes, _ = _stored(run / "checkpoints" / "4")
    assert not [p for p in shapes if p[:2] == ("params", "base")]

    ev = lm_here("eval", "--run", str(run), "--batches", "1")
    assert ev.returncode == 0, ev.stderr[-2000:]
    got = json.loads(ev.stdout.strip().splitlines()[-1])
    recorded = json.loads((run / "summary.json").read_text())["final_val_loss"]
    assert got["step"] == 4 and abs(got["val_loss"] - recorded) < 1e-6, (got, recorded)
    sample = lm_here("sample", "--run", str(run), "--prompt", "ab", "--temperature", "0",
                     "--max-new-tokens", "8")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout == (fixture / "sample_greedy_ab_8.txt").read_text()

    recipe = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
              "model.max_seq_len=64", "data.seq_len=32", "batch_size=4", "log_every=1",
              "eval_every=4", "eval_batches=1", "checkpoint_every=4", "keep_checkpoints=1",
              "optim.warmup_steps=2", "optim.lr=1e-2", "lora.rank=2", "steps=8"]
    resumed = lm("train", "--run-dir", str(run), *sets(*recipe))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 4" in resumed.stdout
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                               [want["train_loss"][str(s)] for s in range(1, 9)], rtol=0, atol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert abs(summary["final_val_loss"] - want["final_val_loss"]) < 1e-6
