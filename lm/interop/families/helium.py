"""Helium (HeliumForCausalLM, Kyutai): Llama with RoPE applied to interleaved channel
pairs (2i, 2i+1) instead of rotate-half's (i, i + head_dim/2), and an output projection
of hidden_size x hidden_size (so n_heads * head_dim must be d_model). The pairs are the
only difference, and they live in the tensor table: q and k channels are permuted within
each head on the way in (and back on the way out); attention scores are unchanged since
q and k move together."""

import dataclasses

import numpy as np

from lm.interop.families import Family, register
from lm.interop.hf_config import DECODER_UNSUPPORTED
from lm.interop.hf_tensors import decoder_tensors


def _pairs_to_halves(entry, dh: int):
    """An entry of q or k ([.., heads, head_dim] in lmlab) with HF's interleaved pairs
    read as rotate-half's halves: lmlab channel j < dh/2 is HF's 2j, j + dh/2 is 2j + 1."""
    perm = np.concatenate([np.arange(0, dh, 2), np.arange(1, dh, 2)])
    inverse = np.argsort(perm)
    return dataclasses.replace(entry, to_lm=lambda t: entry.to_lm(t)[..., perm],
                               to_hf=lambda x: entry.to_hf(np.asarray(x)[..., inverse]))


def tensors(family, cfg):
    return [_pairs_to_halves(e, cfg.dh) if e.path[-1] in ("wq", "wk") else e
            for e in decoder_tensors(family, cfg)]


HELIUM = register(Family(
    model_type="helium", architecture="HeliumForCausalLM",
    export_fields={"attention_bias": False, "mlp_bias": False},
    unsupported=DECODER_UNSUPPORTED + (
        ("model.n_heads * model.head_dim != model.d_model (Helium's o_proj is square)",
         lambda c: c.n_heads * c.dh != c.d_model),),
    tensors=tensors,
))
