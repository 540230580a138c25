"""`lm prune --method 2:4` end to end: a tiny trained run pruned one-shot into a new run
dir, healed with `lm train --init-from` (masks fixed; a resumed heal equals the
uninterrupted one and keeps the masks), exported to Hugging Face as dense weights with
exactly two zeros in every four inputs, imported back with the same logits, evaluated;
learned masks (AST) train from scratch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, lm, sets, train_losses

pytestmark = pytest.mark.slow  # every test here runs `lm` end to end

LLAMA = [*TINY, "model.mlp.activation=swiglu", "steps=8"]  # `lm export hf` can write it


def _state(run_dir, step):
    """The whole train state of checkpoint `step` (params dense, masks, ...)."""
    import dataclasses

    from lm import config as config_lib
    from lm.train.param_source import run_checkpointer
    from lm.train.state import build
    cfg = config_lib.load_run_config(run_dir / "config.json")
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(rules=cfg.mesh.rules))
    pieces = build(cfg)
    ckpt = run_checkpointer(run_dir, pieces)
    try:
        return ckpt.restore_params(step, pieces.abstract_state())
    finally:
        ckpt.close()


def _logits(run_dir, tokens):
    import jax.numpy as jnp
    from flax import nnx

    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(run_dir)
    logits, _ = nnx.merge(run.pieces.graphdef, params)(jnp.asarray(tokens))
    return np.asarray(logits)


def _hf_tokenizer(path, vocab: int):
    """A word-level tokenizer.json with the byte tokenizer's vocabulary size and special
    ids (256-258), so the export imports back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"w{i}" for i in range(256)] + ["<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab])},
                                     unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_prune_heal_resume_export_import(tmp_path):
    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    r = lm("train", "--run-dir", str(dense), *sets(*LLAMA))
    assert r.returncode == 0, r.stderr[-2000:]
    r = lm("prune", str(dense), "--out", str(pruned), "--method", "2:4", "--score", "obs",
           "--calib-batches", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "50% zeros" in r.stdout
    report = json.loads((pruned / "prune.json").read_text())
    assert report["source_step"] == 8 and report["score"] == "obs"
    assert len(report["sparsity"]) == 14 and set(report["sparsity"].values()) == {0.5}
    assert report["calib_loss_after"] > 0 and report["calib_loss_before"] > 0
    config = json.loads((pruned / "config.json").read_text())
    assert config["sparsity"]["mode"] == "fixed"
    masks = _state(pruned, 0)["sparsity"]
    again = lm("prune", str(dense), "--out", str(pruned), "--method", "2:4")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    ev = lm("eval", "--run", str(pruned), "--batches", "2")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["val_loss"] == pytest.approx(
        report["calib_loss_after"], rel=1e-5)

    # Heal with the masks fixed; killed at step 6 and resumed = uninterrupted.
    heal = [*LLAMA, "checkpoint_every=2", "log_every=1"]
    full, resumed = tmp_path / "heal", tmp_path / "heal_resumed"
    r = lm("train", "--run-dir", str(full), "--init-from", str(pruned), *sets(*heal))
    assert r.returncode == 0, r.stderr[-2000:]
    first = lm("train", "--run-dir", str(resumed), "--init-from", str(pruned), *sets(*heal),
               env={"LMLAB_FAULT": "sigterm@5"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    second = lm("train", "--run-dir", str(resumed), "--init-from", str(pruned), *sets(*heal))
    assert second.returncode == 0 and "resumed from step" in second.stdout, second.stderr[-2000:]
    assert train_losses(resumed) == train_losses(full)
    import jax
    healed = _state(full, 8)
    for got, want in zip(jax.tree.leaves(_state(resumed, 8)["sparsity"]), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert json.loads((full / "config.json").read_text())["sparsity"]["mode"] == "fixed"
    for got, want in zip(jax.tree.leaves(healed["sparsity"]), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    from lm.tree import get_path, leaf_paths
    for path, mask in leaf_paths(masks):
        w = np.asarray(get_path(healed["params"], path))
        assert (w[~np.asarray(mask)] == 0).all(), path
    assert train_losses(full)[8] < train_losses(full)[1]  # it heals

    # Export: dense tensors, exactly 2 zeros in every 4 inputs of each projection.
    out = tmp_path / "hf"
    _export_is_2_4(full, out)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    _hf_tokenizer(out / "tokenizer.json", vocab)
    back = tmp_path / "back"
    r = lm("import", "hf", str(out), "--run-dir", str(back))
    assert r.returncode == 0, r.stderr[-2000:]
    tokens = np.arange(64, dtype=np.int32).reshape(2, 32) % 250
    np.testing.assert_allclose(_logits(back, tokens), _logits(full, tokens), atol=1e-5)


def _export_is_2_4(run_dir, out):
    """`lm export hf` of run_dir writes dense projections with exactly 2 zeros in every
    4 inputs (an HF weight is [out, in])."""
    from safetensors.numpy import load_file
    r = lm("export", "hf", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    tensors = load_file(str(out / "model.safetensors"))
    projections = [n for n in tensors if n.endswith("proj.weight")]
    assert len(projections) == 14
    for name in projections:
        w = tensors[name]
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name


def test_learned_masks_train_from_scratch_and_act_wherever_weights_are_read(tmp_path):
    """AST: the masks move until freeze_at; the dense weights train outside them, and
    lm eval and lm export hf read the masked weights (the in-loop evaluation's)."""
    run = tmp_path / "learned"
    r = lm("train", "--run-dir", str(run), *sets(
        *LLAMA, "steps=6", "log_every=1", "eval_every=6", "sparsity.mode=learned",
        "sparsity.update_every=2", "sparsity.freeze_at=4", "optim.lr=0.01"))
    assert r.returncode == 0, r.stderr[-2000:]
    flips, val = {}, None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            flips[rec["step"]] = rec["mask_flips"]
        elif rec["kind"] == "eval":
            val = rec["loss"]
    assert flips[2] + flips[4] > 0
    assert flips[1] == flips[3] == flips[5] == flips[6] == 0
    state = _state(run, 6)
    import jax
    from lm.tree import get_path, leaf_paths
    summary = json.loads((run / "summary.json").read_text())  # for lm analyze --pareto
    assert summary["sparse_pattern"] == "2:4"
    assert summary["sparse_params"] == sum(np.asarray(get_path(state["params"], p)).size
                                           for p, _ in leaf_paths(state["sparsity"]))
    assert any((np.asarray(get_path(state["params"], p))[~np.asarray(m)] != 0).any()
               for p, m in leaf_paths(jax.device_get(state["sparsity"])))  # dense weights
    ev = lm("eval", "--run", str(run), "--batches", "2")
    assert ev.returncode == 0, ev.stderr[-2000:]
    got = json.loads(ev.stdout.strip().splitlines()[-1])["val_loss"]
    assert got == pytest.approx(val, rel=1e-5)
    _export_is_2_4(run, tmp_path / "hf")


def test_lm_compile_counts_the_masks_in_the_state(lm_here, tmp_path):
    sizes = {}
    for mode in ("off", "fixed"):
        out = tmp_path / f"{mode}.json"
        r = lm_here("compile", "--topology", "v5p:2x2x1", "--train-only", "--json", str(out),
                    *sets(*TINY, f"sparsity.mode={mode}"))
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads(out.read_text())
        sizes[mode] = (report[0] if isinstance(report, list) else report)["state_bytes"]
    # one byte per masked weight: 2 layers x (4 attention 32 x 32 + 2 MLP 32 x 128)
    assert sizes["fixed"] - sizes["off"] == 2 * (4 * 32 * 32 + 2 * 32 * 128)


def test_a_bad_pattern_is_one_line_exit_2_from_the_real_command(tmp_path):
    r = lm("train", "--run-dir", str(tmp_path / "r"), *sets(
        *TINY, "sparsity.mode=fixed", "sparsity.pattern=2:3"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not divide by M=3" in lines[0], r.stderr
