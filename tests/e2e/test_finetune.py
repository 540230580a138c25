"""Fine-tuning: `lm train --init-from` (source weights, fresh optimizer, resuming the
fine-tune rather than the base) and instruction data (loss on response tokens only)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, lm, sets

from lm.config import DataConfig
from lm.data import DataError, load_tokenizer, packed_rows

RECORDS = [{"prompt": f"Q{i}: what comes after {i}?", "response": f" {i + 1}, then {i + 2}."}
           for i in range(40)]


def instruction_file(path: Path, records=RECORDS) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def tree_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_instruction_rows_put_the_loss_on_responses_only(tmp_path):
    cfg = DataConfig(corpus=str(instruction_file(tmp_path / "sft.jsonl")),
                     format="instruction", seq_len=64, validation_fraction=0.25)
    tok = load_tokenizer("byte")
    rows = packed_rows(cfg, tok, "train")
    learned = []
    for r in range(len(rows)):
        row = rows[r]
        targets = row["targets"][row["loss_mask"] > 0]
        learned.append(bytes(t for t in targets if t < 256).decode())
        assert (row["loss_mask"][row["segment_ids"] == 0] == 0).all()
    # Every train response (and no prompt text) is a target, each exactly once.
    train = [r for i, r in enumerate(RECORDS) if i % 4 != 3]
    assert sorted("".join(learned)) == sorted("".join(r["response"] for r in train))
    assert "what comes after" not in "".join(learned)
    assert len(packed_rows(cfg, tok, "validation").index) > 0


def test_instruction_data_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    cfg = DataConfig(corpus=str(bad), format="instruction", seq_len=32)
    with pytest.raises(DataError, match="needs fields 'prompt' and 'response'"):
        packed_rows(cfg, load_tokenizer("byte"), "train")


def test_init_from_starts_at_the_source_weights_with_a_fresh_optimizer(tiny_run, tmp_path):
    from lm.config import TrainConfig
    from lm.train.param_source import initial_state, restore_for_inference, with_source_model
    from lm.train.setup import setup_run
    cfg = dataclasses.replace(TrainConfig(), init_from=str(tiny_run), batch_size=4,
                              data=DataConfig(seq_len=32), optim=dataclasses.replace(
                                  TrainConfig().optim, lr=1e-4))
    cfg = with_source_model(cfg, [])
    run = setup_run(cfg)
    state = initial_state(run.pieces)
    _, source_params, _ = restore_for_inference(tiny_run)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(source_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state["step"]) == 0
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) > 0]
    assert moments and all(float(np.abs(np.asarray(x)).max()) == 0 for x in moments)


@pytest.mark.slow
def test_finetune_from_a_run_on_instructions_resumes_itself_not_the_base(tiny_run, tmp_path):
    before = tree_digest(tiny_run / "checkpoints")
    data = instruction_file(tmp_path / "sft.jsonl")
    run = tmp_path / "ft"
    args = ["train", "--init-from", str(tiny_run), "--run-dir", str(run),
            *sets(*TINY, f"data.corpus={data}", "data.format=instruction", "steps=6",
                  "checkpoint_every=100", "eval_every=100")]
    first = lm(*args, env={"LMLAB_FAULT": "sigterm@3"})
    assert first.returncode == 143, first.stderr[-2000:]
    assert "initialised from" in first.stdout
    again = lm(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 3" in again.stdout and "initialised from" not in again.stdout
    assert json.loads((run / "config.json").read_text())["init_from"] == str(tiny_run)
    assert tree_digest(tiny_run / "checkpoints") == before  # the base is only read


def test_context_extension_init_from_changes_positions_not_parameters(tiny_run):
    """The long-context recipe: --init-from a run with a longer max_seq_len and YaRN
    RoPE scaling starts from the source's weights; a knob that changes shapes (width)
    is still refused in one line."""
    from lm.config import ConfigError, TrainConfig, apply_overrides
    from lm.train.param_source import initial_state, restore_for_inference, with_source_model
    from lm.train.setup import setup_run
    base = dataclasses.replace(TrainConfig(), init_from=str(tiny_run), batch_size=4,
                               data=DataConfig(seq_len=128))
    extend = [ "model.max_seq_len=128", "model.rope_scaling.type=yarn",
              "model.rope_scaling.factor=2", "model.rope_scaling.original_max_seq_len=64"]
    cfg = with_source_model(base, extend)
    cfg = apply_overrides(cfg, extend)
    assert cfg.model.rope_scaling.type == "yarn" and cfg.model.max_seq_len == 128
    state = initial_state(setup_run(cfg).pieces)
    _, source_params, _ = restore_for_inference(tiny_run)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(source_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    short = dataclasses.replace(base, data=DataConfig(seq_len=32))
    wider = apply_overrides(with_source_model(short, []), ["model.mlp.ratio=8"])
    with pytest.raises(ConfigError, match="the model differs from the source"):
        initial_state(setup_run(wider).pieces)


def test_init_from_a_mamba2_run_may_change_its_scan_kernel(tmp_path, lm_here):
    """The scan's kernel (model.mamba2.scan_impl, declared free under --init-from like
    model.attention.impl) may differ from the source's; its state size may not."""
    from lm.config import ConfigError, TrainConfig, apply_overrides
    from lm.train.param_source import initial_state, restore_for_inference, with_source_model
    from lm.train.setup import setup_run
    source = tmp_path / "mamba"
    tiny = [o for o in TINY if not o.startswith(("steps=", "checkpoint_every=", "eval_every="))]
    result = lm_here("train", "--run-dir", str(source),
                     *sets(*tiny, "model.mixer_pattern=m", "model.mamba2.state=8",
                           "model.mamba2.chunk=16", "steps=2", "checkpoint_every=2",
                           "eval_every=2"))
    assert result.returncode == 0, result.stderr
    base = dataclasses.replace(TrainConfig(), init_from=str(source), batch_size=4,
                               data=DataConfig(seq_len=32))
    overrides = ["model.mamba2.scan_impl=xla", "model.mamba2.chunk=8"]
    cfg = apply_overrides(with_source_model(base, overrides), overrides)
    assert (cfg.model.mamba2.scan_impl, cfg.model.mamba2.chunk) == ("xla", 8)
    state = initial_state(setup_run(cfg).pieces)
    _, source_params, _ = restore_for_inference(source)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(source_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bigger = apply_overrides(with_source_model(base, []), ["model.mamba2.state=16"])
    with pytest.raises(ConfigError, match="the model differs from the source.*mamba2.state"):
        initial_state(setup_run(bigger).pieces)
