"""Hugging Face model families, one record each: `Family` says which config.json it reads
(model_type), what it writes (architecture), how its config maps to lmlab's ModelConfig
both ways, its tensor table (HF tensor names <-> lmlab parameter paths, with the
transposes and reshapes), and what it refuses, each with a one-line reason.

A new family is one file here that calls `register(Family(...))`, its name in BUILTIN
below, and its reference case in tests/hf_reference.py (tiny random transformers model,
logits compared both ways by tests/e2e/test_interop_hf.py). Families of the Llama lineage
(pre-norm RMSNorm decoder, rotate-half RoPE, SwiGLU) only set the declarative fields
and reuse the shared decoder mapping (lm/interop/hf_config.py) and tensor table
(lm/interop/hf_tensors.py); a family that differs in its body replaces `config_from_hf`,
`config_to_hf` or `tensors`.

`lm import hf` picks the record by config.json's model_type; `lm export hf` (and
`--peft`) writes the first registered family that expresses the model, or the one
named by `--family`: its declared fields (qkv_bias, qk_norm and its scope,
norm_position, window, experts) are what it can express, and `unsupported` the lmlab
knobs it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from lm.config import ConfigError, ModelConfig
from lm.interop.hf_config import (DECODER_REFUSES, DECODER_UNSUPPORTED, decoder_config_from_hf,
                                  decoder_config_to_hf)
from lm.interop.hf_tensors import Entry, decoder_tensors


@dataclass(frozen=True)
class Experts:
    """How a family lays out its mixture-of-experts layers (softmax router, top-k)."""
    count_key: str                 # config.json: number of experts ("num_local_experts")
    width_key: str                 # config.json: an expert's hidden width
    prefix: str                    # tensors under model.layers.{i}.: "block_sparse_moe."
    weights: tuple[str, str, str]  # per-expert gate, up, down tensor names ("w1", "w3", "w2")
    renormalize_key: str | None = None  # config.json switch for renormalised gates; None:
                                        # always renormalised (Mixtral)
    dense_layers: bool = False     # decoder_sparse_step / mlp_only_layers pick dense layers


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family (see the module docstring)."""
    model_type: str                # config.json "model_type" this record reads and writes
    architecture: str              # config.json "architectures"[0] written on export
    # --- what the family's decoder has (read on import, required on export)
    qkv_bias: bool = False         # q/k/v projections carry biases
    qk_norm: bool = False          # RMSNorm on q and k
    qk_norm_scope: str = "head"    # ... per head (Qwen3), or "all" heads at once (OLMo 2)
    norm_position: str = "pre"     # the block's norms: "pre" (Llama), "out" (OLMo 2),
                                   # "peri" (Gemma 2/3); their tensors: hf_tensors.NORMS
    window: str = "switch"         # config.json sliding_window: "always" the window
                                   # (Mistral), "switch" only with use_sliding_window or
                                   # all layer_types sliding (Qwen), "layers" in the
                                   # layers layer_types says (Gemma), else no window
    experts: Experts | None = None # None: dense SwiGLU MLP in every layer
    export_fields: Mapping = field(default_factory=dict)  # fixed fields written on export
    # --- what it refuses
    refuses: Mapping = field(default_factory=lambda: DECODER_REFUSES)
    # import: config.json field -> (the values accepted, why others are refused)
    unsupported: tuple = DECODER_UNSUPPORTED
    # export: (lmlab knob, cfg -> True where the family cannot express it)
    # --- the mappings (the shared Llama-lineage decoder unless the family differs)
    config_from_hf: Callable[["Family", dict], ModelConfig] = decoder_config_from_hf
    config_to_hf: Callable[["Family", ModelConfig], dict] = decoder_config_to_hf
    tensors: Callable[["Family", ModelConfig], list[Entry]] = decoder_tensors

    def problem(self, cfg: ModelConfig) -> str | None:
        """The first lmlab knob of cfg this family cannot express (None: it can)."""
        for knob, bad in self.unsupported:
            if bad(cfg):
                return knob
        a, moe = cfg.attention, "e" in cfg.channel_pattern
        if a.qkv_bias != self.qkv_bias:
            return f"model.attention.qkv_bias={str(a.qkv_bias).lower()}"
        if cfg.norm_position != self.norm_position:
            return f"model.norm_position={cfg.norm_position}"
        if cfg.qk_norm != self.qk_norm:
            return f"model.qk_norm={str(cfg.qk_norm).lower()}"
        if cfg.qk_norm and cfg.qk_norm_scope != self.qk_norm_scope:
            return f"model.qk_norm_scope={cfg.qk_norm_scope}"
        if a.window and self.window not in ("always", "layers"):
            return "model.attention.window"
        if moe != (self.experts is not None):
            return "MoE layers (model.channel_pattern with e)" if moe else "dense layers"
        if moe and not self.experts.dense_layers and set(cfg.channel_pattern) != {"e"}:
            return "dense layers among the MoE ones (model.channel_pattern)"
        if moe and self.experts.renormalize_key is None and not cfg.moe.renormalize:
            return "model.moe.renormalize=false"
        return None


REGISTRY: dict[str, Family] = {}  # model_type -> record, in export preference order


def register(family: Family) -> Family:
    if family.model_type in REGISTRY:
        raise ValueError(f"HF family {family.model_type!r} is registered twice")
    REGISTRY[family.model_type] = family
    return family


def get(model_type: str) -> Family:
    if model_type not in REGISTRY:
        raise ConfigError(f"unknown Hugging Face family {model_type!r} (lmlab has "
                          f"{', '.join(REGISTRY)})")
    return REGISTRY[model_type]


def for_hf(hf: dict) -> Family:
    """The record that reads this config.json, or one line naming what it is."""
    model_type = hf.get("model_type")
    if model_type not in REGISTRY:
        arch = (hf.get("architectures") or ["?"])[0]
        raise ConfigError(f"HF config.json: unsupported architecture {arch} (model_type="
                          f"{model_type!r}; lmlab imports {', '.join(REGISTRY)})")
    return REGISTRY[model_type]


def for_model(cfg: ModelConfig) -> Family:
    """The first registered family that expresses cfg, or one line saying what no family
    expresses (the knob every family refuses, else each family's first problem)."""
    problems: dict[str, list[str]] = {}
    for family in REGISTRY.values():
        problem = family.problem(cfg)
        if problem is None:
            return family
        problems.setdefault(problem, []).append(family.model_type)
    names = ", ".join(REGISTRY)
    if len(problems) == 1:
        raise ConfigError(f"lm export hf: {next(iter(problems))} has no equivalent in the "
                          f"Hugging Face families lmlab exports ({names})")
    raise ConfigError("lm export hf: no Hugging Face family lmlab exports expresses this "
                      "model: " + "; ".join(f"{p} ({', '.join(f)})"
                                            for p, f in problems.items()))


# --- through the records: what import and export call

def model_config_from_hf(hf: dict) -> ModelConfig:
    """An HF config.json (as a dict) -> lmlab's ModelConfig, by its family's record."""
    family = for_hf(hf)
    return family.config_from_hf(family, hf)


def family_for(cfg: ModelConfig) -> str:
    """The model_type of the HF family that expresses this model (the first registered
    one, lm/interop/families), or ConfigError with one line saying why none does."""
    return for_model(cfg).model_type


def hf_config_from_model(cfg: ModelConfig, family: str, bos: int, eos: int, pad: int) -> dict:
    """lmlab ModelConfig -> an HF config.json dict for `family` (see family_for)."""
    record = get(family)
    out = record.config_to_hf(record, cfg)
    out.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return out


def entries(cfg: ModelConfig, family: str) -> list[Entry]:
    """The table for a model of this config in the HF family `family` (a model_type: its
    record here)."""
    record = get(family)
    return record.tensors(record, cfg)


# The built-in families, in export preference order (llama before mistral: a model
# without a window is written as Llama; Helium and Phi-3, which express only what Llama
# and Mistral do, are read on import and written only when asked for by name:
# `lm export hf --family phi3`).
BUILTIN = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "helium", "phi3",
           "olmo2", "gemma2", "gemma3_text")
for _name in BUILTIN:
    __import__(f"{__name__}.{_name}")

__all__ = ["Experts", "Family", "REGISTRY", "register", "get", "for_hf", "for_model",
           "model_config_from_hf", "family_for", "hf_config_from_model", "entries"]
