"""Quantization through the real CLI: `lm quantize` (int8, int4 with groups) writes an
ordinary run that eval / sample / generate / export read, with the quantized values;
a quantized-training run resumes exactly; its step compiles for a TPU topology with
int8 matmuls; bad inputs are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, lm, sets, train_losses

# A model the Hugging Face export expresses (llama: SwiGLU).
PARENT = [*TINY, "model.mlp.activation=swiglu"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    run = tmp_path_factory.mktemp("quant") / "parent"
    result = lm("train", "--run-dir", str(run), *sets(*PARENT))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _rows_are_integer_multiples(w_OI: np.ndarray, qmax: int) -> bool:
    """Every output row a per-row scale times integers in [-qmax, qmax]."""
    scale = np.abs(w_OI).max(axis=1, keepdims=True) / qmax
    q = w_OI / scale
    return bool(np.allclose(q, np.rint(q), atol=1e-3))


def test_int8_run_evaluates_samples_generates_and_exports_dequantized(parent, tmp_path):
    out = tmp_path / "q8"
    result = lm("quantize", str(parent), "--out", str(out), "--weights", "int8",
                "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "quantize.json").read_text())
    assert report["matrices"] == 2 * (4 + 3)  # q, k, v, o + gate, up, down per layer
    assert report["bytes_after"] < report["bytes_before"]
    assert abs(report["loss_after"] - report["loss_before"]) < 0.02
    assert json.loads((out / "config.json").read_text())["quant"]["ptq"] == "int8"

    ev = lm("eval", "--run", str(out), "--batches", "2")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["val_loss"] == pytest.approx(
        report["loss_after"], abs=1e-6)
    sample = lm("sample", "--run", str(out), "--prompt", "RO", "--max-new-tokens", "6")
    assert sample.returncode == 0, sample.stderr[-2000:]
    prompts, done = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text(json.dumps({"prompt": "ROMEO:"}) + "\n")
    gen = lm("generate", "--run", str(out), "--in", str(prompts), "--out", str(done),
             "--temperature", "0", "--max-new-tokens", "6", "--pages", "8",
             "--page-size", "8")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(done.read_text().splitlines()) == 1

    # Export writes the dequantized weights: each output row is its scale times int8
    # integers (the parent's are not).
    from safetensors.numpy import load_file
    for run, quantized in ((out, True), (parent, False)):
        hf = tmp_path / f"hf-{run.name}"
        assert lm("export", "hf", str(run), "--out", str(hf)).returncode == 0
        tensors = load_file(str(hf / "model.safetensors"))
        for name in ("model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.gate_proj.weight"):
            assert _rows_are_integer_multiples(tensors[name], 127) == quantized, name


def test_int4_groups_and_bad_arguments(parent, tmp_path):
    out = tmp_path / "q4"
    result = lm("quantize", str(parent), "--out", str(out), "--weights", "int4",
                "--group-size", "16", "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "quantize.json").read_text())
    assert report["bytes_after"] < report["bytes_before"] / 2  # f32 -> 4 bits + scales
    assert report["loss_after"] - report["loss_before"] < 0.5
    from safetensors.numpy import load_file
    stored = load_file(str(out / "quantized.safetensors"))
    # wq [d_model, heads, head_dim]: groups of 16 of the fan-in d_model=32, per output.
    assert stored["blocks.0.mixer.wq.scale"].shape == (32 // 16, 2 * 16)
    assert stored["blocks.0.mixer.wq.q"].dtype == np.uint8  # two values per byte
    bad_args = ((tmp_path / "bad", ["--weights", "int4", "--group-size", "12"],
                 "does not divide the fan-in"),
                (tmp_path / "bad", ["--weights", "int4", "--group-size", "1"], "must be even"),
                (tmp_path / "bad", ["--weights", "int2"], "int8 or int4"),
                (out, ["--weights", "int8"], "not empty"))
    for dest, args, message in bad_args:
        bad = lm("quantize", str(parent), "--out", str(dest), *args)
        assert bad.returncode == 2, bad.stderr[-2000:]
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()


def test_quantized_training_resumes_exactly(tmp_path):
    extra = ["quant.mode=train", "log_every=1"]
    full, run = tmp_path / "full", tmp_path / "resumed"
    assert lm("train", "--run-dir", str(full), *sets(*TINY, *extra)).returncode == 0
    first = lm("train", "--run-dir", str(run), *sets(*TINY, *extra),
               env={"LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    second = lm("train", "--run-dir", str(run), *sets(*TINY, *extra))
    assert second.returncode == 0 and "resumed from step 6" in second.stdout
    assert train_losses(full) == train_losses(run)
    # ... and it is not the unquantized run.
    plain = tmp_path / "plain"
    assert lm("train", "--run-dir", str(plain), *sets(*TINY, "log_every=1")).returncode == 0
    assert train_losses(plain) != train_losses(full)


def test_quantized_step_compiles_for_tpu_with_int8_matmuls(tmp_path, lm_here):
    report = tmp_path / "r.json"
    r = lm_here("compile", "--topology", "v5p:2x2x1", "--train-only", "--json", str(report),
                *sets(*TINY, "mesh.fsdp=4", "batch_size=8", "model.attention.impl=xla",
                      "quant.mode=train"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quantized matmuls: 16 int8" in r.stdout
    (rep,) = json.loads(report.read_text())
    assert rep["low_precision_dots"] == {"int8": 16}
    # The roofline's compute time at v5p's int8 peak (918 TOPS), half the bf16 one's.
    plain = tmp_path / "plain.json"
    r = lm_here("compile", "--topology", "v5p:2x2x1", "--train-only", "--json", str(plain),
                *sets(*TINY, "mesh.fsdp=4", "batch_size=8", "model.attention.impl=xla"))
    (base,) = json.loads(plain.read_text())
    assert base["low_precision_dots"] == {}
    assert rep["t_compute"] == pytest.approx(base["t_compute"] * 459 / 918)


@pytest.mark.parametrize("overrides,message", [
    (["quant.rules=blocks/7/channel"], "matches no module"),
    (["quant.act=int4"], "quant.act"),
    (["quant.rules=blocks/0/mixer=int8,e4m3"], "unknown dtype 'e4m3'"),
])
def test_bad_quant_config_is_one_line_exit_2(tmp_path, lm_here, overrides, message):
    run = tmp_path / "run"
    r = lm_here("train", "--run-dir", str(run), *sets(*TINY, "quant.mode=train", *overrides))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not run.exists()
