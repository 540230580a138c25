"""`lm export hf RUN --out DIR --peft`: a LoRA run as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads onto the Hugging Face base model, with the adapter model's logits.

The factors are re-derived in the HF layout rather than reshaped from lmlab's: each
adapted weight's update A @ B (lmlab layout) goes through the same conversion as the
weight itself (lm/interop/hf_tensors.py: HF [out, in]), and its rank-r SVD (exact: the
update has rank <= r) is split into PEFT's lora_B [out, r] and lora_A [r, in]. So every
layout difference of the export table (transposes, head reshapes, the MLP's output
projection stored [d_model, d_ff]) is handled in one place, the table. PEFT scales by
lora_alpha / r, as lmlab does; a DyLoRA adapter is written at its full rank.

The base: when the run's `init_from` is a Hugging Face directory, adapter_config.json
names it (base_model_name_or_path); otherwise (an lmlab run or the run's own init) the
frozen base is written beside the adapter as a plain HF model in DIR/base and named.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from lm.config import ConfigError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def write_adapter(out_dir: Path, run, params: dict, run_dir,
                  write_base: Callable[[Path], str], family: str | None = None) -> str:
    """The LoRA run `run` (a RunSetup; `params` its restored params) -> the adapter
    directory out_dir, and its base where that is not a Hugging Face directory:
    `write_base(dir)` writes the base model there (hf_export.py write_model, in
    `family` if named) and describes it. A Hugging Face base is adapted in its own
    family's module names; a family that fuses matrices lmlab adapts separately (Phi-3's
    qkv_proj, gate_up_proj) is refused: its adapters are not a PEFT LoRA of rank r."""
    from safetensors.numpy import save_file

    from lm.interop.families import entries
    from lm.interop.hf_export import choose_family
    from lm.interop.hf_import import read_hf_config
    from lm.peft.lora import low_rank_factors, target_paths
    from lm.tree import path_key
    from lm.train.param_source import HFDirectory, from_init_from
    cfg = run.cfg
    lora = cfg.lora
    if not lora.rank:
        raise ConfigError(f"lm export hf --peft: {run_dir} is not a LoRA run (lora.rank = 0)")
    hf_base = bool(cfg.init_from) and isinstance(from_init_from(cfg.init_from), HFDirectory)
    if hf_base:  # the base's own family, whose module names PEFT will look for
        base_family = read_hf_config(Path(cfg.init_from))["model_type"]
        if family not in (None, base_family):
            raise ConfigError(f"lm export hf --peft --family {family}: the base "
                              f"{cfg.init_from} is {base_family}")
        family = base_family
    family = choose_family(cfg.model, family)
    table = {e.path: e for e in entries(cfg.model, family)}
    tensors, modules = {}, []
    for path in target_paths(lora, params["base"], cfg.model):
        ad = params["adapters"][path_key(path)]
        update = np.tensordot(np.asarray(jax.device_get(ad["a"]), np.float64),
                              np.asarray(jax.device_get(ad["b"]), np.float64), axes=1)
        entry = table[path]
        if entry.fused:
            raise ConfigError(f"lm export hf --peft: {family}'s {entry.hf_names[0]} fuses "
                              f"matrices lmlab adapts separately ({'/'.join(path[-2:])}); "
                              "export the merged model instead (without --peft)")
        (hf_update,) = entry.to_hf(update)  # [out, in]
        b, a = map(np.asarray, low_rank_factors(hf_update, lora.rank))
        module = entry.hf_names[0].removesuffix(".weight")
        modules.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    if hf_base:
        base, base_note = str(Path(cfg.init_from).absolute()), f"base {cfg.init_from}"
    else:
        base = str((out_dir / "base").absolute())
        base_note = "base in base/ as " + write_base(out_dir / "base")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "base_model_name_or_path": base,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return (f"a PEFT LoRA adapter (r={lora.rank}, alpha={lora.alpha}, {len(modules)} "
            f"modules): {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}; {base_note}")
