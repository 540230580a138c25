"""`lm import gguf FILE.gguf --run-dir DIR`: a llama.cpp GGUF checkpoint (Llama, Mistral,
Qwen2, Qwen3 architectures) -> an lmlab run directory, read with the `gguf` package.

A GGUF is turned into the Hugging Face directory it stands for, then imported by
`lm import hf` (lm/interop/hf_import.py), so the family records, the config checks, the
special-id checks and the run-dir layout are that importer's and only the translation
lives here (as transformers' GGUF loader does it, which the tests compare against):

- config.json from the metadata (`{arch}.block_count`, `.embedding_length`, ...; the head
  size from `.attention.key_length`, else `.rope.dimension_count`, else hidden / heads;
  the vocabulary and tied embeddings from the tensors; `model_type` llama for llama.cpp's
  "llama", which Mistral files use too);
- the tensors, each dequantized by the package (`gguf.dequantize`: F32, F16, BF16, Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1, the K-quants Q2_K..Q6_K, ...) to float32 and renamed to HF's
  names; llama.cpp stores Llama's q/k projections with each head's rows permuted for its
  RoPE layout (convert_hf_to_gguf.py's `permute`), which is undone here as transformers
  undoes it (Qwen files are not permuted);
- the tokenizer from the metadata (lm/interop/gguf_tokenizer.py).

The HF directory is written beside the run dir (one safetensors file per tensor, so one
dequantized tensor is in memory at a time; it takes float32 room on disk for the
duration) and removed afterwards. Refused in one line (exit 2, nothing written): another
architecture, RoPE scaling (`rope.scaling.type`, a `rope_freqs` tensor), a tensor this
mapping does not place, a tokenizer model other than "gpt2" / "llama".
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lm.config import ConfigError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF -> model_type
# llama.cpp's tensor names -> HF's ({i}: the layer).
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    **{f"attn_{p}.{w}": f"model.layers.{{i}}.self_attn.{p}_proj.{w}"
       for p in "qkv" for w in ("weight", "bias")},
}


def read_gguf(path: Path):
    """(The metadata by key, the tensors by name) of a GGUF file (tensors memory-mapped,
    not read)."""
    from gguf import GGUFReader
    if not path.is_file():
        raise ConfigError(f"lm import gguf: {path} is not a file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (a damaged or foreign file: one line)
        raise ConfigError(f"lm import gguf: {path} is not a readable GGUF file "
                          f"({type(e).__name__}: {e})") from None
    meta = {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def hf_config(meta: dict, tensors: dict, source: str) -> dict:
    """The config.json the file's metadata stands for (module doc)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"lm import gguf: {source} is a {arch!r} model; lmlab imports "
                          f"GGUF architectures {sorted(ARCHITECTURES)}")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ConfigError(f"lm import gguf: {source} lacks {arch}.{name}")
        return value
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"lm import gguf: {source} scales RoPE ({arch}.rope.scaling.type="
                          f"{scaling!r}), which lm import gguf does not map")
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"lm import gguf: {source} scales RoPE (a rope_freqs tensor, as "
                          "Llama-3.1 files do), which lm import gguf does not map")
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"lm import gguf: {source} has no token_embd.weight")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = meta.get(f"{arch}.attention.key_length",
                        meta.get(f"{arch}.rope.dimension_count", hidden // heads))
    out = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(key("context_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # (ggml order: [d, V])
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
        if meta.get(f"tokenizer.ggml.{gguf_key}") is not None:
            out[name] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return out


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head: rows [0, 2, 4, ..., 1, 3, ...] of
    HF's rotate-half layout interleaved into RoPE pairs)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(
        w.shape)


def hf_name(name: str, source: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    template = TENSOR_NAMES.get(m.group(2) if m else name)
    if template is None or ("{i}" in template) != bool(m):
        raise ConfigError(f"lm import gguf: tensor {name} of {source} has no place in the "
                          "models lm import gguf reads")
    return template.format(i=m.group(1)) if m else template


def write_hf_dir(meta: dict, tensors: dict, source: str, out: Path) -> None:
    """`out` as the HF directory the file stands for: config.json, one safetensors file
    per tensor (dequantized, renamed, q/k unpermuted for Llama), the tokenizer files."""
    from gguf import dequantize
    from safetensors.numpy import save_file

    from lm.interop.gguf_tokenizer import write_tokenizer
    config = hf_config(meta, tensors, source)
    names = {name: hf_name(name, source) for name in tensors}  # all placed, before any work
    write_tokenizer(meta, source, out)
    for n, (name, tensor) in enumerate(tensors.items()):
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        except NotImplementedError:
            raise ConfigError(f"lm import gguf: tensor {name} of {source} is "
                              f"{tensor.tensor_type.name}, which the gguf package does not "
                              "dequantize") from None
        w = w.reshape([int(d) for d in reversed(tensor.shape)])  # ggml's order reversed
        if config["model_type"] == "llama" and re.search(r"\.attn_[qk]\.weight$", name):
            w = unpermute(w, config["num_attention_heads"] if ".attn_q." in name
                          else config["num_key_value_heads"])
        save_file({names[name]: np.ascontiguousarray(w)}, str(out / f"t{n:05d}.safetensors"))
        del w
    (out / "config.json").write_text(json.dumps(config, indent=2))


def import_gguf(path: str | Path, run_dir: str | Path) -> int:
    from lm.interop.hf_import import check_run_dir, import_hf
    path, run_dir = Path(path), Path(run_dir)
    check_run_dir(run_dir, "gguf")
    meta, tensors = read_gguf(path)
    run_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lm-gguf-", dir=run_dir.absolute().parent))
    try:
        write_hf_dir(meta, tensors, str(path), staging)
        return import_hf(staging, run_dir, source=path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["import_gguf", "read_gguf", "hf_config", "write_hf_dir"]
