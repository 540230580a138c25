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
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from lm.errors import ConfigError  # re-exported: the one definition
from lm.model.recursive import Recursion  # noqa: E402  (imports only lm.errors from here)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling for longer contexts, with Hugging Face's `rope_scaling` names and
    semantics (formulas: lm/model/rope_scaling.py)."""
    type: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0  # HF original_max_position_embeddings; 0 = max_seq_len
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn mscale; 0 = HF's default 0.1 * ln(factor) + 1


@dataclass(frozen=True)
class ModelConfig:
    """The model's shared knobs. Each mixer adds its own section (model.attention,
    model.mamba2, model.retention, model.mlp, ...: see lm/model/mixers), attached below
    by `_with_sections`."""
    vocab_size: int = 0  # 0 = take the tokenizer's vocabulary size
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (multi-head); 1 = MQA; in between = GQA
    head_dim: int = 0  # 0 = d_model // n_heads
    norm: Literal["rms", "layer"] = "rms"
    norm_position: Literal["pre", "post", "peri"] = "pre"
    norm_eps: float = 1e-6  # added to the mean square in every norm (HF: rms_norm_eps)
    layernorm_scaling: bool = False  # scale each block's norm outputs by 1/sqrt(layer index)
    qk_norm: bool = False
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    # Layers sharing blocks, with per-layer LoRA relaxations (lm/model/recursive.py).
    recursion: Recursion = field(default_factory=Recursion)
    tie_embeddings: bool = True
    parallel_block: bool = False  # x + mixer(norm(x)) + channel(norm(x))
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
    # Sequence mixer per layer by code letter, cycled over the layers: a = attention,
    # m = Mamba-2 (SSD), r = RetNet retention. "a" = a transformer; "mmma" = attention
    # every 4th layer.
    mixer_pattern: str = "a"
    # Channel mixer per layer, cycled likewise: f = the MLP, e = mixture of experts
    # ("fe" = MoE every 2nd layer).
    channel_pattern: str = "f"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class DataConfig:
    # "shakespeare" (the embedded corpus) or a path: a text/JSONL/Parquet file, a
    # directory or glob of them, or a directory written by `lm data prepare`.
    corpus: str = "shakespeare"
    # "byte" | path to a SentencePiece .model | path to a Hugging Face tokenizer.json
    tokenizer: str = "byte"
    seq_len: int = 256
    text_field: str = "text"  # JSONL / Parquet column holding the document text
    # text: documents, every token a target; instruction: JSONL prompt/response records
    # (or chat `messages`, with the tokenizer's chat template where it has one), the loss
    # on response / assistant tokens only (lm/data/instruction.py)
    format: Literal["text", "instruction"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    validation_corpus: str = ""  # "" = split the corpus by document (see lm/data/sources.py)
    validation_fraction: float = 0.1
    # Batches read and put on the devices ahead of the step by a thread (0 = none).
    # -1 = auto: 2 on GPU/TPU; 0 on CPU, where the "device" is the host's own cores and a
    # reading thread takes them from the step (see lm/data/prefetch.py: prefetch_depth).
    prefetch: int = -1
    read_threads: int = 0  # grain threads reading rows ahead (0 = in the prefetch thread)
    # Seed of the training data order; -1 = the run's `seed`. Fixing it while `seed`
    # varies separates init noise from data-order noise in a seed study (and lets
    # batched trials share one data stream: lm/train/trials.py).
    seed: int = -1


@dataclass(frozen=True)
class OptimConfig:
    """The shared optimizer chain's knobs (clip, weight decay, LR schedule); `name`
    picks the update direction, whose own knobs are its section (optim.adamw, ...: see
    lm/optim), attached below by `_with_sections`."""
    name: str = "adamw"
    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final decay
    min_lr_ratio: float = 0.1
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
    expert: int = 1  # expert parallelism (MoE layers); elsewhere it splits the batch
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    # Overrides of the logical-axis rules, e.g. "embed=fsdp+tensor,vocab=" (see
    # lm/parallel/sharding.py for the names and defaults).
    rules: str = ""
    # Attention with the sequence sharded (sequence > 1): allgather = gather K/V along
    # the sequence; ring = pass K/V blocks around the ring (lm/parallel/ring.py).
    sequence_attention: Literal["allgather", "ring"] = "allgather"


def _with_sections(base: type, plugins: list, kind: str) -> type:
    """`base` plus one field per plug-in: its config section, named after it. The plug-in
    files own their knobs; this class only gathers them (so config.json, --set and
    validation see one typed tree). `legacy` keys of the sections are remembered for
    reading configs written before the sections existed."""
    extra = [(p.name, p.Config, field(default_factory=p.Config)) for p in plugins]
    cls = dataclasses.make_dataclass(base.__name__, extra, bases=(base,), frozen=True,
                                     module=__name__)
    cls.__doc__ = base.__doc__
    cls.__qualname__ = base.__qualname__
    cls.moved_keys = {}  # old flat key -> [(section, field)]
    for p in plugins:
        for old, new in getattr(p.Config, "legacy", {}).items():
            cls.moved_keys.setdefault(old, []).append((p.name, new))
    cls.plugin_kind = kind
    return cls


from lm.model import mixers as _mixers  # noqa: E402  (they import only lm.errors from here)
from lm import optim as _optim  # noqa: E402

ModelConfig = _with_sections(ModelConfig, _mixers.all_mixers(), "mixer")
OptimConfig = _with_sections(OptimConfig, _optim.all_directions(), "optimizer")


from lm.peft.lora import LoRAConfig  # noqa: E402
from lm.peft import lora as _lora  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # lm/peft/lora.py
    name: str = "run"
    seed: int = 0
    # Start from these weights (a run dir or a Hugging Face model dir) instead of a
    # random init; the model section is the source's (lm/train/param_source.py).
    init_from: str = ""
    steps: int = 1000
    batch_size: int = 32  # global batch, in sequences
    # Cross-entropy over chunks of this many positions, so the [batch, seq, vocab] f32
    # logits never exist at once (lm/train/step.py). -1 = auto: 512 from a 32k vocabulary
    # up, else whole; 0 = whole.
    loss_chunk: int = -1
    grad_accum: int = 1  # microbatches per step (batch_size must divide)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8  # 0 = the whole validation split
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    # Multi-process runs agree on a SIGTERM/SIGINT every this many steps (a host barrier,
    # no device sync) and all stop after the same step; one process stops at once.
    stop_sync_every: int = 10

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed < 0 else self.data.seed


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
    except ConfigError:
        raise  # already one line (e.g. an unknown size asked of lm.configs.sizes)
    except Exception as e:  # the user's file is at fault: one line, not a traceback
        raise ConfigError(describe_file_error(e, path, what)) from None
    finally:
        sys.path.pop(0)
    return module


def describe_file_error(e: BaseException, path: Path, what: str) -> str:
    """'<what> FILE, line N: Error: message' for an exception raised while running a
    user's Python file: the syntax error's own line, else the deepest frame in FILE."""
    line = None
    if isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path.resolve():
        line, message = e.lineno, e.msg
    else:
        message = str(e)
        for frame in traceback.extract_tb(e.__traceback__):
            if Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
    where = f"{what} {path}" + (f", line {line}" if line else "")
    first = (message.strip().splitlines() or [""])[0]
    return f"{where}: {type(e).__name__}: {first}" if first else f"{where}: {type(e).__name__}"


def load_config_file(path: str | Path) -> TrainConfig:
    """`FILE` -> FILE's config(); `FILE:ARG` -> config("ARG") (one file for a family of
    configs, e.g. configs/pod.py:7b)."""
    arg = None
    text = str(path)
    if not Path(text).is_file() and ":" in text:
        text, arg = text.rsplit(":", 1)
    module = exec_python_file(text, "config file")
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {text} defines no config() function")
    try:
        cfg = module.config() if arg is None else module.config(arg)
    except ConfigError:
        raise
    except Exception as e:
        if isinstance(e, TypeError) and arg is not None and "positional argument" in str(e):
            raise ConfigError(f"config() in {text} takes no argument (got {arg!r})") from None
        raise ConfigError(describe_file_error(e, Path(text), "config file")) from None
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


def _legacy_targets(node: Any, name: str, value_is_section: bool) -> list[tuple[str, str]]:
    """Where a flat key of an earlier release lives now ([] if it is a current key). A
    key that names a section now (e.g. `mlp`, once the activation) is legacy only when
    given a plain value."""
    targets = getattr(type(node), "moved_keys", {}).get(name, [])
    if name in {f.name for f in dataclasses.fields(node)} and value_is_section:
        return []
    return targets


def _set(node: Any, parts: list[str], raw: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if len(parts) == 1 and (moved := _legacy_targets(node, parts[0], False)):
        for section, name in moved:  # an old flat key: set it where it lives now
            node = _set(node, [section, name], raw, key)
        return node
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


def _migrate_legacy(d: dict, cls: type) -> dict:
    """Move the flat keys of an earlier release's config.json into their sections."""
    legacy = getattr(cls, "moved_keys", {})
    if not legacy:
        return d
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, targets in legacy.items():
        if old not in out or (old in names and isinstance(out[old], dict)):
            continue
        value = out.pop(old)
        for section, name in targets:
            out.setdefault(section, {}).setdefault(name, value)
    return out


def from_dict(d: dict, cls: type = TrainConfig, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    d = _migrate_legacy(d, cls)
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


def load_run_config(path: str | Path) -> TrainConfig:
    """A run directory's config.json; a damaged one (cut short, garbled, edited into
    nonsense) is a ConfigError naming the file, never a traceback."""
    path = Path(path)
    try:
        return from_json(path.read_text())
    except ConfigError as e:
        raise ConfigError(f"{path} is not a valid run config ({e})") from None
    except (OSError, ValueError, TypeError, AttributeError) as e:  # JSON, UTF-8, shape
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path} is damaged, not a readable run config ({reason})") from None


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
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} "
            "(set model.head_dim to decouple them)")
    if m.dh % 2:
        raise ConfigError(f"model.head_dim={m.dh} must be even for RoPE")
    if m.norm_eps <= 0:
        raise ConfigError(f"model.norm_eps must be positive, got {m.norm_eps}")
    if m.logit_softcap < 0:
        raise ConfigError(f"model.logit_softcap must be >= 0, got {m.logit_softcap}")
    from lm.model import rope_scaling
    rope_scaling.validate(m)
    _mixers.validate(m)  # the layer patterns, then each mixer in use
    from lm.model import recursive
    recursive.validate(m)
    # The mesh axes fixed in the config (a -1 axis is checked once devices fill it).
    from lm.parallel.sharding import MESH_AXES
    _mixers.validate_mesh(m, {a: getattr(cfg.mesh, a) * getattr(cfg.mesh, f"dcn_{a}")
                              for a in MESH_AXES if getattr(cfg.mesh, a) > 0})
    if m.scan_layers and (len(set(m.mixer_pattern)) > 1 or len(set(m.channel_pattern)) > 1):
        raise ConfigError(f"model.scan_layers needs one mixer type per kind; mixer_pattern="
                          f"{m.mixer_pattern!r}, channel_pattern={m.channel_pattern!r} "
                          "(set model.scan_layers=false)")
    positive("model.mup_base_width", m.mup_base_width)
    positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}")
    seq_shards = cfg.mesh.sequence * cfg.mesh.dcn_sequence
    if cfg.mesh.sequence_attention == "ring" and seq_shards > 1 and d.seq_len % (2 * seq_shards):
        raise ConfigError(f"mesh.sequence_attention=ring needs data.seq_len={d.seq_len} to "
                          f"divide by 2 x mesh.sequence ({2 * seq_shards}): the zig-zag layout")
    if not 0 < d.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}")
    _lora.validate(cfg.lora, m)
    _optim.validate(o)  # the direction's name, then its own section
    _optim.validate_mup(o, m)  # model.init=mup needs the direction's muP rule
    positive("optim.lr", o.lr)
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    for key in ("weight_decay", "clip_norm", "z_loss"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key} must be >= 0, got {getattr(o, key)}")
    for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints", "stop_sync_every"):
        positive(key, getattr(cfg, key))
    if d.prefetch < -1:
        raise ConfigError(f"data.prefetch must be >= 0 (or -1 = auto), got {d.prefetch}")
    if d.read_threads < 0:
        raise ConfigError(f"data.read_threads must be >= 0, got {d.read_threads}")
    if cfg.loss_chunk < -1:
        raise ConfigError(f"loss_chunk must be >= 0 (or -1 = auto), got {cfg.loss_chunk}")
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
    "LoRAConfig",
    "load_config_file", "apply_overrides", "validate", "resolve", "to_json", "from_json",
    "load_run_config",
    "from_dict", "to_dict", "config_diff",
]
