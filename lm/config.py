"""Typed, frozen run configuration.

A run is described by one `TrainConfig` tree of frozen dataclasses. It is built by
a Python config file (a module with a `config()` function), modified by `--set
section.key=value` overrides, validated, and written as `config.json` into the run
dir, from which it can be rebuilt exactly (`from_json`).

Errors a user can cause raise `ConfigError` with one line naming the key; the CLI
prints it and exits 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0 = take the tokenizer's vocabulary size
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (multi-head); 1 = MQA; in between = GQA
    head_dim: int = 0  # 0 = d_model // n_heads
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_ratio: float = 4.0
    norm: Literal["rms", "layer"] = "rms"
    norm_position: Literal["pre", "post", "peri"] = "pre"
    layernorm_scaling: bool = False  # scale each block's norm outputs by 1/sqrt(layer index)
    qk_norm: bool = False
    rope_theta: float = 10_000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x))
    logit_softcap: float = 0.0  # 0 = off; else cap * tanh(logits / cap)
    init: Literal["standard", "mup"] = "standard"
    init_std: float = 0.02
    mup_base_width: int = 256
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = False
    # Rematerialisation of each block in the backward pass: none | full (save only the
    # block inputs) | dots (save matmul outputs) | dots_no_batch (save matmuls without
    # batch dimensions: weights-side products, not attention scores).
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # xla: materialised scores (any backend); pallas: the flash-attention kernel in
    # kernels/attention (interpret mode on CPU); cudnn: jax.nn.dot_product_attention's
    # cuDNN path (NVIDIA GPUs only; no sinks, no max-logit diagnostic).
    attention_impl: Literal["xla", "pallas", "cudnn"] = "xla"
    # xla training attention: queries in this many blocks, each scoring only the keys
    # causality leaves it (1 = one dense score matrix; 0 = auto: blocks of >= 128
    # queries, at most 8, which measured best on CPU at seq 256).
    attention_q_blocks: int = 0
    attention_window: int = 0  # 0 = full causal attention; w = see the last w tokens
    attention_sinks: int = 0  # with a window: the first s tokens of a document stay visible
    # Sequence mixer per layer, cycled over the layers: a = attention, m = Mamba-2 (SSD),
    # r = RetNet multi-scale retention. "a" = a transformer; "mmma" = attention every 4th.
    mixer_pattern: str = "a"
    ssm_state: int = 64  # Mamba-2 state size N per head
    ssm_expand: int = 2  # Mamba-2 inner width = ssm_expand * d_model
    ssm_conv: int = 4  # Mamba-2 causal depthwise convolution width
    scan_chunk: int = 64  # chunk length of the linear-recurrence scan
    scan_impl: Literal["auto", "pallas", "xla"] = "auto"  # auto: pallas on GPU/TPU

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def d_ff(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    def mixer(self, layer: int) -> str:
        """'a', 'm' or 'r': the sequence mixer of layer `layer` (from 0)."""
        return self.mixer_pattern[layer % len(self.mixer_pattern)]

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose mixer is attention."""
        return tuple(i for i in range(self.n_layers) if self.mixer(i) == "a")


@dataclass(frozen=True)
class DataConfig:
    # "shakespeare" (the embedded corpus) or a path: a text/JSONL/Parquet file, a
    # directory or glob of them, or a directory written by `lm data prepare`.
    corpus: str = "shakespeare"
    # "byte" | path to a SentencePiece .model | path to a Hugging Face tokenizer.json
    tokenizer: str = "byte"
    seq_len: int = 256
    text_field: str = "text"  # JSONL / Parquet column holding the document text
    validation_corpus: str = ""  # "" = split the corpus by document (see lm/data/sources.py)
    validation_fraction: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final decay
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # True: decay by weight_decay * schedule(t)/lr, i.e. not multiplied by the peak LR
    # (Wortsman et al. 2023); False: AdamW's decay lr(t) * weight_decay.
    independent_weight_decay: bool = False
    clip_norm: float = 1.0  # 0 = off
    z_loss: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes within a slice (ICI) per axis, one may be -1 (fill with the
    remaining devices), times sizes across slices (DCN, multislice TPU pods)."""
    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    # Overrides of the logical-axis rules, e.g. "embed=fsdp+tensor,vocab=" (see
    # lm/parallel/sharding.py for the names and defaults).
    rules: str = ""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    name: str = "run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # global batch, in sequences
    grad_accum: int = 1  # microbatches per step (batch_size must divide)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # 0 = the whole validation split
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True


# ----------------------------------------------------------------------------- load


def exec_python_file(path: str | Path, what: str):
    """Import a Python file (a config or sweep spec) as a module. Such files may import
    their neighbours (e.g. `from sizes import sized`), so their folder is on sys.path
    while they load."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    spec = importlib.util.spec_from_file_location(f"lm_{what.replace(' ', '_')}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def load_config_file(path: str | Path) -> TrainConfig:
    module = exec_python_file(path, "config file")
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {path} defines no config() function")
    cfg = module.config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"config() in {path} must return a TrainConfig")
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `a.b=value` strings; values are parsed by the field's declared type."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        cfg = _set(cfg, key.split("."), raw, key)
    return cfg


def _set(node: Any, parts: list[str], raw: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if parts[0] not in fields:
        raise ConfigError(f"unknown config key '{key}'")
    f = fields[parts[0]]
    hint = typing.get_type_hints(type(node))[f.name]
    current = getattr(node, f.name)
    if dataclasses.is_dataclass(current):
        if len(parts) == 1:
            raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
        return dataclasses.replace(node, **{f.name: _set(current, parts[1:], raw, key)})
    if len(parts) > 1:
        raise ConfigError(f"unknown config key '{key}'")
    return dataclasses.replace(node, **{f.name: _parse(raw, hint, key)})


def _parse(raw: str, hint: Any, key: str) -> Any:
    raw = raw.strip()
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    if hint is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
    if hint is str:
        return raw
    raise ConfigError(f"{key}: cannot set a field of type {hint} from the command line")


# ----------------------------------------------------------------------------- JSON


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(d: dict, cls: type = TrainConfig, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'")
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (object)")
            kwargs[k] = from_dict(v, hint, key + ".")
        else:
            kwargs[k] = _check_type(v, hint, key)
    return cls(**kwargs)


def _check_type(v: Any, hint: Any, key: str) -> Any:
    if typing.get_origin(hint) is Literal:
        if v not in typing.get_args(hint):
            raise ConfigError(f"{key}: expected one of {typing.get_args(hint)}, got {v!r}")
        return v
    if hint is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if hint in (int, float, str, bool) and (type(v) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {v!r}")
    return v


def from_json(text: str) -> TrainConfig:
    return from_dict(json.loads(text))


# ----------------------------------------------------------------------------- validate


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check cross-field consistency; raise ConfigError naming the offending key."""
    m, d, o = cfg.model, cfg.data, cfg.optim

    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")

    for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        positive(f"model.{key}", getattr(m, key))
    for key in ("n_kv_heads", "head_dim", "vocab_size"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0, got {getattr(m, key)}")
    positive("model.mlp_ratio", m.mlp_ratio)
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} "
            "(set model.head_dim to decouple them)")
    if m.dh % 2:
        raise ConfigError(f"model.head_dim={m.dh} must be even for RoPE")
    if m.n_heads % m.kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.kv_heads} must divide model.n_heads={m.n_heads}")
    if m.logit_softcap < 0:
        raise ConfigError(f"model.logit_softcap must be >= 0, got {m.logit_softcap}")
    if not m.mixer_pattern or set(m.mixer_pattern) - set("amr"):
        raise ConfigError(f"model.mixer_pattern={m.mixer_pattern!r} must be a non-empty "
                          "string of a (attention), m (Mamba-2) and r (retention)")
    if m.scan_layers and len(set(m.mixer_pattern)) > 1:
        raise ConfigError(f"model.scan_layers needs one mixer type; mixer_pattern="
                          f"{m.mixer_pattern!r} mixes several (set model.scan_layers=false)")
    for key in ("attention_window", "attention_sinks"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0, got {getattr(m, key)}")
    if m.attention_sinks and not m.attention_window:
        raise ConfigError("model.attention_sinks needs model.attention_window > 0")
    if m.attention_impl == "cudnn" and m.attention_sinks:
        raise ConfigError("model.attention_impl=cudnn does not support attention_sinks "
                          "(use pallas or xla)")
    if m.attention_q_blocks < 0:
        raise ConfigError(f"model.attention_q_blocks must be >= 0, got {m.attention_q_blocks}")
    for key in ("ssm_state", "ssm_expand", "ssm_conv", "scan_chunk"):
        positive(f"model.{key}", getattr(m, key))
    if "m" in m.mixer_pattern and (m.ssm_expand * m.d_model) % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide the Mamba-2 inner width "
                          f"ssm_expand * d_model = {m.ssm_expand * m.d_model}")
    positive("model.mup_base_width", m.mup_base_width)
    positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}")
    if not 0 < d.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}")
    positive("optim.lr", o.lr)
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    for key in ("b1", "b2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(o, key)}")
    for key in ("eps", "weight_decay", "clip_norm", "z_loss"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key} must be >= 0, got {getattr(o, key)}")
    for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints"):
        positive(key, getattr(cfg, key))
    if cfg.eval_batches < 0:
        raise ConfigError(f"eval_batches must be >= 0, got {cfg.eval_batches}")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} must divide batch_size={cfg.batch_size}")
    return cfg


def resolve(config_path: str | Path, overrides: list[str]) -> TrainConfig:
    return validate(apply_overrides(load_config_file(config_path), overrides))


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Keys whose values differ, as 'key: a -> b' strings."""
    out = []

    def walk(x: dict, y: dict, prefix: str) -> None:
        for k in x:
            if isinstance(x[k], dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y[k]:
                out.append(f"{prefix}{k}: {x[k]!r} -> {y[k]!r}")

    walk(to_dict(a), to_dict(b), "")
    return out


__all__ = [
    "ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "MeshConfig", "TrainConfig",
    "load_config_file", "apply_overrides", "validate", "resolve", "to_json", "from_json",
    "from_dict", "to_dict", "config_diff",
]
