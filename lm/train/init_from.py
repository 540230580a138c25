"""`lm train --init-from SOURCE` (config field `init_from`): a run that starts from the
weights of another run's latest intact checkpoint or of a Hugging Face model directory,
with its own data and optimizer settings; the optimizer state starts fresh and the step
counter at 0. The model section is the source's (the weights fix it), with the
`--set model.*` overrides of the command applied on top (e.g. remat, compute dtype);
the tokenizer is the source's unless the command sets `data.tokenizer`. Setting
`model.recursion.*` turns the source into a (relaxed) recursive model or back
(lm/model/recursive.py).

The source is read only when the run dir holds no checkpoint: rerunning the same
command resumes the fine-tune from its own checkpoints, never the base again. (Except a
LoRA run's frozen base, which its checkpoints leave out: it is read again, from the
source checkpoint step pinned at the first start, lm/peft/base_ref.py.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.model import recursive


def source_kind(source: str) -> str:
    """'run' (an lmlab run dir) or 'hf' (a Hugging Face model dir), or ConfigError."""
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ConfigError(f"init_from={source}: no config.json there (neither an lmlab run "
                          "nor a Hugging Face model directory)")
    try:
        head = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={source}: config.json is not readable JSON ({e})") from None
    return "hf" if isinstance(head, dict) and "model_type" in head else "run"


def source_config(source: str) -> tuple[config_lib.ModelConfig, str]:
    """(the source's model config, its tokenizer spec)."""
    if source_kind(source) == "hf":
        from lm.interop.hf_config import model_config_from_hf
        from lm.interop.hf_import import read_hf_config
        tok = Path(source).absolute() / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"init_from={source}: the Hugging Face directory has no "
                              "tokenizer.json")
        return model_config_from_hf(read_hf_config(Path(source))), str(tok)
    cfg = config_lib.load_run_config(Path(source) / "config.json")
    return cfg.model, cfg.data.tokenizer


def with_source_model(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """cfg with the model (and, unless overridden, the tokenizer) of cfg.init_from."""
    if not cfg.init_from:
        return cfg
    source = str(Path(cfg.init_from).absolute())
    model, tokenizer = source_config(source)
    data = cfg.data
    if not any(o.strip().startswith("data.tokenizer=") for o in overrides):
        data = dataclasses.replace(data, tokenizer=tokenizer)
    out = dataclasses.replace(cfg, model=model, data=data, init_from=source)
    out = config_lib.apply_overrides(out, [o for o in overrides if o.strip().startswith("model.")])
    return config_lib.validate(out)


def initial_state(pieces) -> dict:
    """The train state of a run that starts from cfg.init_from: the source's weights
    (shapes checked, placed on this run's shardings), a fresh optimizer state."""
    from lm.interop.hf_import import fresh_state, load_params
    cfg = pieces.cfg
    source = Path(cfg.init_from)
    if cfg.lora.rank:  # the source is the frozen base, pinned by lm/peft/base_ref.py
        from lm.peft.base_ref import initial_state as lora_initial_state
        return lora_initial_state(pieces)[1]
    if source_kind(str(source)) == "hf" and recursive.enabled(cfg.model):
        # A Hugging Face model is untied: load it as the parent, then tie its layers.
        from lm.train.state import build
        parent = build(dataclasses.replace(cfg, model=recursive.untied(cfg.model)), pieces.mesh)
        base = _converted(load_params(source, parent.cfg, parent), parent.cfg.model, pieces)
    elif source_kind(str(source)) == "hf":
        base = load_params(source, cfg, pieces)
    else:
        _, base = _run_params(source, pieces)
    return fresh_state(pieces, base)


def _run_params(source: Path, pieces, step: int | None = None) -> tuple[int, dict]:
    """(step, params) of a run's newest intact checkpoint (or of checkpoint `step`: a
    pinned LoRA base, lm/peft/base_ref.py), restored onto this run's mesh."""
    from lm.peft.base_ref import restore_step, run_checkpointer
    from lm.train.state import build
    src_cfg = config_lib.load_run_config(source / "config.json")
    src_model, model = src_cfg.model, pieces.cfg.model
    if src_model.recursion != model.recursion:  # tying / untying layers: compare the parents
        src_model, model = recursive.untied(src_model), recursive.untied(model)
    if src_model != model:
        diff = [d for d in config_lib.config_diff(dataclasses.replace(src_cfg, model=src_model),
                                                  dataclasses.replace(src_cfg, model=model))
                if d.startswith("model.")]
        free = set(config_lib.keys_with_role("free_init"))  # (declared on the fields)
        structural = [d for d in diff if d.split(":")[0] not in free]
        if structural:
            raise ConfigError(f"init_from={source}: the model differs from the source's "
                              f"({'; '.join(structural[:3])})")
    # The source's own train state (its optimizer's shape), laid out on this mesh.
    src_pieces = build(dataclasses.replace(src_cfg, mesh=pieces.cfg.mesh), pieces.mesh)
    merge = None
    if src_cfg.lora.rank:  # a LoRA source: its adapters folded into its base
        from lm.peft.lora import merged_params
        merge = lambda p: merged_params(src_cfg.model, src_cfg.lora, p)  # noqa: E731
    ckpt = run_checkpointer(source, src_pieces)
    read = lambda s: ckpt.restore_params(s, src_pieces.abstract_state())  # noqa: E731
    try:
        restored = (ckpt.restore_newest_intact(read, rename=False) if step is None
                    else restore_step(ckpt, step, read, source))
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"init_from={source}: the run has no checkpoint yet")
    got, state = restored
    if step is None:  # a fine-tune's first start (a pinned step is a LoRA base's rebuild)
        print(f"initialised from {source} (checkpoint step {got})", flush=True)
    params = state["params"] if merge is None else jax.jit(merge)(state["params"])
    return got, _converted(params, src_cfg.model, pieces)


def _converted(params: dict, source_model, pieces) -> dict:
    """Params of `source_model` as this run's model's, when the two differ in their
    recursion (lm/model/recursive.py: tied blocks averaged, relaxations by SVD)."""
    model = pieces.cfg.model
    if source_model.recursion == model.recursion:
        return params
    if recursive.enabled(model):
        print(f"recursion: the {model.n_layers} layers tied into {model.recursion.blocks} "
              f"block(s) ({model.recursion.order}; averaged), relaxation rank "
              f"{model.recursion.relax_rank} (SVD of each layer's residual)", flush=True)
    else:
        print(f"recursion: untied into {model.n_layers} layers", flush=True)
    shardings = pieces.state_shardings["params"]
    if pieces.cfg.lora.rank:  # (a LoRA run's model params are its frozen base)
        shardings = shardings["base"]
    return jax.jit(lambda p: recursive.convert(p, source_model, model, pieces.cfg.seed),
                   out_shardings=shardings)(params)

