"""`lm export hf RUN --out DIR`: a run's latest intact checkpoint -> a Hugging Face model
directory (config.json, model.safetensors, the tokenizer when the run has a
tokenizer.json) that transformers' AutoModelForCausalLM loads with the same logits.
A LoRA run is written merged (W0 + scale * A @ B: a plain model of the base's family), or
with --peft as a PEFT adapter directory (lm/interop/hf_peft.py); a recursive run untied
(each layer's block plus its relaxation, lm/model/recursive.py). The family is chosen
from the model's knobs (the first record of lm/interop/families that expresses it), or
named by --family (phi3: Llama's function with fused projections); knobs no family
expresses are refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from lm.config import ConfigError
from lm.data.chat_template import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from lm.data.tokenizers import GENERATION_CONFIG, SPECIAL_TOKENS_MAP
from lm.interop.families import entries, family_for, get, hf_config_from_model
from lm.model import recursive
from lm.tree import get_path


def hf_tensors(model_cfg, family: str, params: dict) -> dict[str, np.ndarray]:
    """lmlab params -> {HF name: array}; parameters are fetched one at a time."""
    out, parts = {}, {}
    for entry in entries(model_cfg, family):
        value = np.asarray(jax.device_get(get_path(params, entry.path)))
        for name, tensor in zip(entry.hf_names, entry.to_hf(value)):
            if entry.fused:  # one part of a fused tensor: joined below, in table order
                parts.setdefault(name, []).append(tensor)
            else:
                out[name] = np.ascontiguousarray(tensor)
    for name, pieces in parts.items():
        out[name] = np.ascontiguousarray(np.concatenate(pieces, axis=0))
    return out


def _check_empty(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"lm export hf: --out {out_dir} exists and is not empty "
                          "(nothing is overwritten)")


def choose_family(model_cfg, family: str | None) -> str:
    """`family` (lm export hf --family) where it expresses the model, else the first
    family that does (ConfigError with one line where none does)."""
    if family is None:
        return family_for(model_cfg)
    problem = get(family).problem(model_cfg)
    if problem is not None:
        raise ConfigError(f"lm export hf --family {family}: {problem} has no equivalent in "
                          f"{family} ({family_for_or_none(model_cfg)})")
    return family


def family_for_or_none(model_cfg) -> str:
    try:
        return f"{family_for(model_cfg)} expresses this model"
    except ConfigError:
        return "no family lmlab exports expresses this model"


def write_model(out_dir: Path, cfg, tok, params: dict, family: str | None = None) -> str:
    """A plain (no LoRA) model's params -> config.json, model.safetensors and the
    tokenizer's files in out_dir; returns a description ("llama (LlamaForCausalLM):
    config.json, ..."). `family`: the HF family to write (default: the first that
    expresses the model)."""
    from safetensors.numpy import save_file
    model_cfg, notes = cfg.model, ""
    if recursive.enabled(model_cfg):  # HF has no tied layers: each layer's own weights
        params, model_cfg = recursive.untie(params, model_cfg), recursive.untied(model_cfg)
        notes = f", recursion untied into {model_cfg.n_layers} layers"
    family = choose_family(model_cfg, family)
    hf = hf_config_from_model(model_cfg, family, tok.bos_id, tok.eos_id, tok.pad_id)
    tensors = hf_tensors(model_cfg, family, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    files = ["config.json", "model.safetensors"]
    tokenizer = Path(cfg.data.tokenizer)
    if tokenizer.suffix == ".json" and tokenizer.is_file():
        # The tokenizer and, beside it, its special tokens, chat template and the ids
        # generation stops at (a generation_config.json may list several).
        for name in ("tokenizer.json", TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP,
                     CHAT_TEMPLATE_FILE, GENERATION_CONFIG):
            src = tokenizer if name == "tokenizer.json" else tokenizer.parent / name
            if src.is_file():
                shutil.copyfile(src, out_dir / name)
                files.append(name)
    else:
        files.append("no tokenizer.json (the run's tokenizer is not a Hugging Face one)")
    return f"{family} ({hf['architectures'][0]}): {', '.join(files)}{notes}"


def export_hf(run_dir: str | Path, out_dir: str | Path, peft: bool = False,
              family: str | None = None) -> int:
    """`peft`: a LoRA run as a PEFT adapter directory (lm/interop/hf_peft.py) instead of
    a merged model. `family`: the HF family (model_type) to write, e.g. phi3 (fused
    projections) for a model Llama also expresses; default: the first that does."""
    from lm.train.param_source import restore_for_inference

    out_dir = Path(out_dir)
    _check_empty(out_dir)
    if family is not None:
        get(family)  # an unknown name: one line before anything is read
    run, params, step = restore_for_inference(run_dir)
    cfg = run.cfg
    if peft:
        from lm.interop.hf_peft import write_adapter
        what = write_adapter(out_dir, run, params, run_dir, lambda base_dir: write_model(
            base_dir, cfg, run.tokenizer, params["base"], family), family)
    elif cfg.lora.rank:  # one plain model: the adapters folded into the weights
        from lm.peft.lora import merged_params
        what = write_model(out_dir, cfg, run.tokenizer, merged_params(cfg.model, cfg.lora, params),
                           family) + ", LoRA adapters merged"
    else:
        what = write_model(out_dir, cfg, run.tokenizer, params, family)
    print(f"exported {run_dir} (checkpoint step {step}) to {out_dir} as {what}")
    return 0
