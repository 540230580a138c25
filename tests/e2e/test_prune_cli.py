"""`lm prune`: a tiny GQA / SwiGLU run pruned in depth and in width through the CLI; each
new run is an ordinary run (`lm eval` reproduces prune.json's calibration loss on the same
batches, `lm train --init-from` trains on from it, `lm export hf` takes the width-pruned
one and refuses the depth-pruned one in one line); wrong requests exit 2 with one line."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, lm, sets

pytestmark = pytest.mark.slow  # runs `lm` end to end

MODEL = ["model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
         "model.mlp.activation=swiglu", "steps=4", "checkpoint_every=4", "eval_every=4"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    run = tmp_path_factory.mktemp("prune") / "parent"
    result = lm("train", "--run-dir", str(run), *sets(*TINY, *MODEL))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _eval_loss(lm_here, run, batches: int) -> float:
    result = lm_here("eval", "--run", str(run), "--batches", str(batches))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["val_loss"]


def test_depth_and_width_pruned_runs_are_ordinary_runs(parent, tmp_path, lm_here):
    depth = tmp_path / "depth"
    result = lm("prune", str(parent), "--out", str(depth), "--method", "depth",
                "--remove", "2", "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((depth / "prune.json").read_text())
    assert report["method"] == "depth" and len(report["scores"]) == 6
    assert len(report["removed"]) == 2 and report["params_after"] < report["params_before"]
    config = json.loads((depth / "config.json").read_text())["model"]
    assert config["mixer_pattern"].count("-") + config["channel_pattern"].count("-") == 2
    assert len(config["mixer_pattern"]) == 3 and not config["scan_layers"]
    # `lm eval` on the calibration batches (the first validation batches) agrees.
    assert _eval_loss(lm_here, depth, 2) == pytest.approx(report["calib_loss_after"], rel=1e-5)

    width = tmp_path / "width"
    result = lm_here("prune", str(parent), "--out", str(width), "--method", "width",
                "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--d-model", "24",
                "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((width / "prune.json").read_text())
    assert report["after"] == {"heads": 2, "kv_heads": 1, "ffn": 64, "d_model": 24}
    model = json.loads((width / "config.json").read_text())["model"]
    assert (model["d_model"], model["n_heads"], model["n_kv_heads"], model["head_dim"]) == (
        24, 2, 1, 8)  # head_dim kept (32 // 4), now explicit
    assert _eval_loss(lm_here, width, 2) == pytest.approx(report["calib_loss_after"], rel=1e-5)

    tuned = tmp_path / "tuned"
    result = lm("train", "--run-dir", str(tuned), "--init-from", str(depth),
                *sets("data.seq_len=32", "batch_size=4", "steps=2", "log_every=1",
                      "eval_every=2", "eval_batches=1", "checkpoint_every=2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tuned / "config.json").read_text())["model"]["channel_pattern"] == \
        config["channel_pattern"]

    exported = lm_here("export", "hf", str(width), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    refused = lm_here("export", "hf", str(depth), "--out", str(tmp_path / "hf_depth"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--method", "magnitude"], "unknown --method"),
    (["--method", "depth", "--remove", "7"], "only 6 sublayers"),
    (["--method", "depth", "--remove", "6"], "every sublayer"),
    (["--method", "depth"], "one of --remove K or --fraction F"),
    (["--method", "depth", "--remove", "1", "--heads", "2"], "--heads is not one of"),
    (["--method", "width", "--heads", "8"], "larger than"),
    (["--method", "width", "--heads", "3"], "not a multiple of the KV heads"),
    (["--method", "width", "--heads", "4", "--kv-heads", "1"], "query heads per group"),
])
def test_wrong_requests_are_one_line(parent, tmp_path, lm_here, args, message):
    out = tmp_path / "out"
    result = lm_here("prune", str(parent), "--out", str(out), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_an_existing_out_a_run_without_checkpoint_and_a_lora_run(parent, tmp_path, lm_here):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    result = lm_here("prune", str(parent), "--out", str(taken), "--method", "depth",
                     "--remove", "1")
    assert result.returncode == 2 and "--force" in result.stderr
    assert (taken / "x").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((parent / "config.json").read_text())
    result = lm_here("prune", str(empty), "--out", str(tmp_path / "o"), "--method", "depth",
                     "--remove", "1")
    assert result.returncode == 2 and "no checkpoint" in result.stderr, result.stderr
    lora = tmp_path / "lora"
    lora.mkdir()
    config = json.loads((parent / "config.json").read_text())
    config["lora"]["rank"] = 4
    (lora / "config.json").write_text(json.dumps(config))
    result = lm_here("prune", str(lora), "--out", str(tmp_path / "o"), "--method", "width",
                     "--heads", "2")
    assert result.returncode == 2 and "LoRA" in result.stderr, result.stderr
