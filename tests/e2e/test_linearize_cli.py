"""`lm linearize` end to end: a tiny trained run linearized into retention (then
evaluated, and LoRA-fine-tuned with `lm train --init-from`) and into Mamba-2 for one
layer; the refusals are one line, exit 2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import lm, sets, train_losses


@pytest.fixture(scope="module")
def linearized(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("linearize") / "retention"
    result = lm("linearize", str(tiny_run), "--to", "retention", "--out", str(out),
                "--transfer-steps", "3", "--eval-batches", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_a_linearized_run_is_an_ordinary_run(linearized, tmp_path):
    report = json.loads((linearized / "linearize.json").read_text())
    config = json.loads((linearized / "config.json").read_text())
    assert config["model"]["mixer_pattern"] == "rr" and report["layers"] == [0, 1]
    assert config["model"]["retention"]["feature_map"] == "hedgehog"
    for when in ("mse_before", "mse_after"):
        assert set(report[when]) == {"0", "1"}
        assert all(math.isfinite(v["mse"]) and v["mse"] > 0 for v in report[when].values())
    assert all(math.isfinite(v) for v in report["eval_loss"].values())
    # `lm eval` reads it like any run, and measures what the report says.
    result = lm("eval", "--run", str(linearized), "--batches", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    loss = json.loads(result.stdout.strip().splitlines()[-1])["val_loss"]
    assert abs(loss - report["eval_loss"]["linearized"]) < 1e-4
    # Stage two: LoRA on the hybrid (retention's wq/wk/wv/wo are the default targets).
    ft = tmp_path / "lora"
    result = lm("train", "--run-dir", str(ft), "--init-from", str(linearized),
                *sets("lora.rank=4", "data.seq_len=32", "batch_size=4", "steps=2",
                      "log_every=1", "eval_every=2", "eval_batches=1", "checkpoint_every=2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(train_losses(ft)) == [1, 2]


def test_one_layer_into_mamba2_a_window_hybrid_and_the_refusals(tiny_run, linearized, tmp_path,
                                                                lm_here):
    out = tmp_path / "mamba2"
    result = lm_here("linearize", str(tiny_run), "--to", "mamba2", "--layers", "1",
                     "--out", str(out), "--transfer-steps", "2", "--eval-batches", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model"]["mixer_pattern"] == "am"
    out = tmp_path / "window"
    result = lm_here("linearize", str(tiny_run), "--to", "retention", "--layers", "0",
                     "--keep-window", "8", "--out", str(out), "--transfer-steps", "2",
                     "--eval-batches", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["mixer_pattern"] == "ra" and model["retention"]["window"] == 8
    assert lm_here("sample", "--run", str(out), "--max-new-tokens", "4",
                   "--prompt", "To be").returncode == 0
    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    shutil.copyfile(tiny_run / "config.json", empty / "config.json")
    for args, message in (
            ([str(tiny_run), "--to", "mlp"], "unknown target mixer"),
            ([str(tiny_run), "--to", "mamba2", "--keep-window", "4"], "retention only"),
            ([str(tiny_run), "--to", "retention", "--layers", "2"], "layer 2 is out of range"),
            ([str(linearized), "--to", "mamba2", "--layers", "0"], "not an attention layer"),
            ([str(empty), "--to", "retention"], "has no checkpoint yet")):
        bad = tmp_path / "bad"
        result = lm_here("linearize", *args, "--out", str(bad))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not bad.exists()
