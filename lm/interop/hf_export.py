"""`lm export hf RUN --out DIR`: a run's latest intact checkpoint -> a Hugging Face model
directory (config.json, model.safetensors, the tokenizer when the run has a
tokenizer.json) that transformers' AutoModelForCausalLM loads with the same logits.
A LoRA run is written merged (W0 + scale * A @ B: a plain model of the base's family,
not a PEFT adapter directory); a recursive run untied (each layer's block plus its
relaxation, lm/model/recursive.py). The family is chosen from the model's knobs
(lm/interop/hf_config.py family_for);
knobs no exported family expresses are refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from lm.config import ConfigError
from lm.interop.hf_config import family_for, hf_config_from_model
from lm.interop.hf_tensors import entries, get_path
from lm.model import recursive


def hf_tensors(model_cfg, family: str, params: dict) -> dict[str, np.ndarray]:
    """lmlab params -> {HF name: array}; parameters are fetched one at a time."""
    out = {}
    for entry in entries(model_cfg, family):
        value = np.asarray(jax.device_get(get_path(params, entry.path)))
        for name, tensor in zip(entry.hf_names, entry.to_hf(value)):
            out[name] = np.ascontiguousarray(tensor)
    return out


def export_hf(run_dir: str | Path, out_dir: str | Path) -> int:
    from safetensors.numpy import save_file

    from lm.train.setup import restore_for_inference

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"lm export hf: --out {out_dir} exists and is not empty "
                          "(nothing is overwritten)")
    run, params, step = restore_for_inference(run_dir)
    cfg, tok = run.cfg, run.tokenizer
    merged = ""
    if cfg.lora.rank:  # one plain model: the adapters folded into the weights
        from lm.peft.lora import merged_params
        params, merged = merged_params(cfg.model, cfg.lora, params), ", LoRA adapters merged"
    model_cfg = cfg.model
    if recursive.enabled(model_cfg):  # HF has no tied layers: each layer's own weights
        params, model_cfg = recursive.untie(params, model_cfg), recursive.untied(model_cfg)
        merged += f", recursion untied into {model_cfg.n_layers} layers"
    family = family_for(model_cfg)
    hf = hf_config_from_model(model_cfg, family, tok.bos_id, tok.eos_id, tok.pad_id)
    tensors = hf_tensors(model_cfg, family, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_note = "no tokenizer.json (the run's tokenizer is not a Hugging Face one)"
    if cfg.data.tokenizer.endswith(".json") and Path(cfg.data.tokenizer).is_file():
        shutil.copyfile(cfg.data.tokenizer, out_dir / "tokenizer.json")
        tokenizer_note = "tokenizer.json"
    print(f"exported {run_dir} (checkpoint step {step}) as {family} "
          f"({hf['architectures'][0]}) to {out_dir}: config.json, model.safetensors, "
          f"{tokenizer_note}{merged}")
    return 0
