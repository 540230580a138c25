"""Where each lmlab parameter lives in a Hugging Face checkpoint, and how its layout
differs. One `Entry` per lmlab parameter: the HF tensor names it is made of (several for
MoE experts, which HF stores one per expert) and the two conversions, so import and
export read the same table and cannot drift apart. `decoder_tensors` is the table of the
Llama-lineage families; each family's record (lm/interop/families/) names its own.

HF stores Linear weights as [out, in]; lmlab stores attention projections as
[d_model, heads, head_dim] / [heads, head_dim, d_model], MLP input projections as
[d_model, d_ff] and the MLP output projection as [d_model, d_ff] (torch's own layout),
expert weights stacked over experts. Both use the rotate-half RoPE form on the same
channel order (HF checkpoints of Llama are already permuted to it), so q and k need no
permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lm.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    path: tuple  # into the lmlab params dict, e.g. ("blocks", 0, "mixer", "wq")
    hf_names: tuple[str, ...]
    to_lm: Callable[[list[np.ndarray]], np.ndarray]  # the HF tensors -> the lmlab array
    to_hf: Callable[[np.ndarray], list[np.ndarray]]  # and back, one per hf_name
    # One part of a fused HF tensor (Phi-3's qkv_proj, gate_up_proj): to_lm reads its
    # rows of the whole tensor, to_hf gives those rows, and export concatenates the parts
    # of a tensor along axis 0 in table order.
    fused: bool = False


def _same(names, path):
    return Entry(path, tuple(names), lambda t: t[0], lambda x: [x])


def _transposed(name, path):
    return Entry(path, (name,), lambda t: t[0].T, lambda x: [np.ascontiguousarray(x.T)])


def _qkv(name, path, heads, dh):
    """[heads * dh, d] <-> [d, heads, dh]."""
    return Entry(path, (name,), lambda t: t[0].T.reshape(-1, heads, dh),
                 lambda x: [np.ascontiguousarray(x.reshape(x.shape[0], -1).T)])


def _o_proj(name, path, heads, dh):
    """o_proj [d, heads * dh] <-> [heads, dh, d]."""
    return Entry(path, (name,), lambda t: t[0].T.reshape(heads, dh, -1),
                 lambda x: [np.ascontiguousarray(x.reshape(heads * dh, -1).T)])


def _experts(names, path):
    """One [out, in] tensor per expert <-> lmlab's stack over experts ([E, in, out])."""
    return Entry(path, tuple(names), lambda t: np.stack([w.T for w in t]),
                 lambda x: [np.ascontiguousarray(w.T) for w in x])


# A block's norms by model.norm_position: (HF module name, lmlab's). pre: Llama's; out:
# OLMo 2's (only on the sublayers' outputs); peri: Gemma 2/3's (both sides of each).
NORMS = {
    "pre": (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")),
    "out": (("post_attention_layernorm", "attn_out_norm"),
            ("post_feedforward_layernorm", "mlp_out_norm")),
    "peri": (("input_layernorm", "norm1"), ("post_attention_layernorm", "attn_out_norm"),
             ("pre_feedforward_layernorm", "norm2"),
             ("post_feedforward_layernorm", "mlp_out_norm")),
}


def rows(entry: Entry, name: str, start: int, stop: int) -> Entry:
    """`entry` (one HF tensor [out, in]) read from rows [start, stop) of the fused HF
    tensor `name` (see Entry.fused)."""
    return Entry(entry.path, (name,), lambda t: entry.to_lm([t[0][start:stop]]), entry.to_hf,
                 fused=True)


def decoder_tensors(family, cfg: ModelConfig) -> list[Entry]:
    """The shared Llama-lineage decoder's table for a model of this config in `family`
    (a lm.interop.families.Family: its experts' tensor names)."""
    h, kv, dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    out = [_same(["model.embed_tokens.weight"], ("embed",)),
           _same(["model.norm.weight"], ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(_transposed("lm_head.weight", ("unembed",)))
    pattern = (cfg.channel_pattern * cfg.n_layers)[:cfg.n_layers]
    norms = NORMS[cfg.norm_position]
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        att, mix = p + "self_attn.", b + ("mixer",)
        out += [_same([p + f"{name}.weight"], b + (norm, "scale")) for name, norm in norms]
        out += [_qkv(att + "q_proj.weight", mix + ("wq",), h, dh),
                _qkv(att + "k_proj.weight", mix + ("wk",), kv, dh),
                _qkv(att + "v_proj.weight", mix + ("wv",), kv, dh),
                _o_proj(att + "o_proj.weight", mix + ("wo",), h, dh)]
        if cfg.attention.qkv_bias:
            out += [_same([att + f"{w}_proj.bias"], mix + (f"b{w}",)) for w in "qkv"]
        if cfg.qk_norm:
            out += [_same([att + "q_norm.weight"], mix + ("q_norm", "scale")),
                    _same([att + "k_norm.weight"], mix + ("k_norm", "scale"))]
        ch = b + ("channel",)
        if pattern[i] == "f":
            out += [_transposed(p + "mlp.gate_proj.weight", ch + ("w_gate",)),
                    _transposed(p + "mlp.up_proj.weight", ch + ("w_in",)),
                    _same([p + "mlp.down_proj.weight"], ch + ("w_out",))]
            continue
        ex, n = family.experts, range(cfg.moe.n_experts)
        moe = p + ex.prefix
        gate, up, down = ([f"{moe}experts.{e}.{w}.weight" for e in n] for w in ex.weights)
        out += [_transposed(moe + "gate.weight", ch + ("router",)),
                _experts(gate, ch + ("w_gate",)), _experts(up, ch + ("w_in",)),
                _experts(down, ch + ("w_out",))]
    return out


# Tensors some checkpoints carry that hold nothing lmlab needs: RoPE's inverse
# frequencies (recomputed from rope_theta) and, for tied embeddings, a copy of the table.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
