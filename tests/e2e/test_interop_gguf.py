"""`lm import gguf` (lm/interop/gguf_import.py, lm/interop/gguf_tokenizer.py).

tests/hf_reference.py `gguf` writes tiny random Llama / Mistral / Qwen2 / Qwen3 models
as GGUF files with the gguf package (each matrix type quantized by the package's own
quantizers; K-quants as random blocks, which it decodes but cannot make) and loads each
with transformers
(`from_pretrained(dir, gguf_file=...)`): its logits, the token ids of a text and of a
chat. lmlab imports the same file: the logits agree to float32 tolerance (both
dequantize with the gguf package; Llama's q/k rows unpermuted), the tokenizer rebuilt
from the metadata (byte-level BPE with Llama-3's split, SentencePiece-style pieces with
scores) gives transformers' ids, BOS framing and chat rendering. Bad inputs need no
torch and always run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_interop_hf import HERE, hf_python, logits_of, needs_hf

CASES = ["llama-f32", "llama-f16", "llama-bf16", "llama-q8_0", "llama-q4_0", "llama-q4_1",
         "llama-q5_0", "llama-q5_1", "llama-q2_k", "llama-q3_k", "llama-q4_k", "llama-q5_k",
         "llama-q6_k", "mistral-q4_0", "qwen2-q8_0", "qwen3-q8_0",
         "llama-spm-f16"]
TOL = 1e-5  # relative to the logits' scale


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from lm.interop.gguf_import import import_gguf
    ref = tmp_path_factory.mktemp("gguf")
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "gguf", str(ref)],
                   check=True, capture_output=True, text=True, timeout=900)
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    print("\n| GGUF | max abs logit diff | max abs logit |\n|---|---|---|")
    for case in CASES:
        assert import_gguf(ref / f"{case}.gguf", runs / case) == 0
        want = np.load(ref / f"{case}.logits.npy")
        got = logits_of(runs / case, np.load(ref / f"{case}.tokens.npy"))
        diff = float(np.max(np.abs(got - want)))
        out[case] = dict(run=runs / case, diff=diff, scale=float(np.abs(want).max()),
                         ref=json.loads((ref / f"{case}.json").read_text()))
        print(f"| {case} | {diff:.2e} | {out[case]['scale']:.1f} |")
    return out


@needs_hf
@pytest.mark.parametrize("case", CASES)
def test_gguf_imports_with_transformers_logits(imported, case):
    r = imported[case]
    assert r["scale"] > 1.0  # not all ~0 (a vacuous match)
    assert r["diff"] < TOL * r["scale"], (r["diff"], r["scale"])


@needs_hf
@pytest.mark.parametrize("case", ["llama-q8_0", "qwen2-q8_0", "qwen3-q8_0", "llama-spm-f16",
                                  "mistral-q4_0"])
def test_gguf_tokenizer_is_transformers(imported, case):
    """The tokenizer rebuilt from the metadata: transformers' ids for a text (BOS framing
    from add_bos_token, "llama" files without the flag too), its decoding, and the chat
    template's prompt ids."""
    from lm.data.chat_template import chat_prompt, find_chat_template
    from lm.data.tokenizers import load_tokenizer
    r = imported[case]
    ref = r["ref"]
    tok = load_tokenizer(str(r["run"] / "tokenizer.json"))
    assert tok.vocab_size == ref["vocab"]  # nothing appended
    ids = [int(i) for i in tok.frame(tok.encode(ref["text"]))]
    assert ids == ref["ids"]
    assert tok.decode(ids) == ref["decoded"]
    template = find_chat_template(tok)
    if "chat_ids" in ref:
        assert chat_prompt(tok, template, ref["chat"], "test")[0] == ref["chat_ids"]
    else:
        assert template is None


def _write_gguf(path: Path, arch: str, tokenizer: str = "gpt2", **keys) -> Path:
    """A GGUF with a header and an embedding only (refused before its tensors count)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_context_length(16)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _write_gguf(p / "m.gguf", "gemma"), "is a 'gemma' model; lmlab imports GGUF "
                                                   "architectures"),
    (lambda p: _write_gguf(p / "m.gguf", "llama", tokenizer="t5"),
     "tokenizer (tokenizer.ggml.model='t5') is not one lmlab rebuilds"),
    (lambda p: _write_gguf(p / "m.gguf", "llama", rope_scaling_type=gguf.RopeScalingType.YARN),
     "scales RoPE (llama.rope.scaling.type='yarn')"),
    (lambda p: (p / "m.gguf").write_bytes(b"not a gguf") and p / "m.gguf",
     "is not a readable GGUF file"),
    (lambda p: p / "absent.gguf", "is not a file"),
])
def test_bad_gguf_is_one_line_exit_2(tmp_path, lm_here, make, message):
    path = make(tmp_path)
    result = lm_here("import", "gguf", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lm-gguf")] == []
