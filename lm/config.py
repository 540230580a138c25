"""Typed, frozen run configuration.

A run is described by one `TrainConfig` tree of frozen dataclasses. It is built by
a Python config file (a module with a `config()` function), modified by `--set
section.key=value` overrides, validated, and written as `config.json` into the run
dir, from which it can be rebuilt exactly (`from_json`).

Each section's schema lives with its owner (lm/model/config.py, lm/optim/config.py,
each mixer's and optimizer's file, lm/peft/lora.py); this module composes them into
`TrainConfig`, reads, writes and validates it. Every field is a `lm.schema.knob`: its
doc and roles (operational, free under --init-from, eval-time, traced) are declared
with it, and every list of fields with a role is computed (`keys_with_role`).
Plug-in sections (a mixer's `model.<name>`, an optimizer's `optim.<name>`) are read
from the registry whenever they are used, so a plug-in may be imported at any time.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lm import optim as _optim
from lm.compress import distill as _distill
from lm.compress.distill import DistillConfig
from lm.compress import sparsity as _sparsity
from lm.compress.sparsity import SparsityConfig
from lm.compress import quant_rules as _quant_rules
from lm.compress.quant_rules import QuantConfig
from lm.data import mixture as _mixture
from lm import schema
from lm.errors import ConfigError  # re-exported: the one definition
from lm.evals import task_config as _task_config
from lm.evals.task_config import TaskEvalConfig
from lm.model import mixers as _mixers
from lm.model import recursive, rope_scaling
from lm.model.config import ModelConfig
from lm.model.recursive import Recursion  # noqa: F401  (re-exported)
from lm.model.rope_scaling import RopeScaling  # noqa: F401  (re-exported)
from lm.optim.config import OptimConfig
from lm.parallel.sharding import MESH_AXES
from lm.peft import lora as _lora
from lm.peft.lora import LoRAConfig
from lm.post import rl_config as _rl
from lm.post.rl_config import RLConfig
from lm.post import preference as _preference
from lm.post.preference import PreferenceConfig
from lm.schema import knob, section
from lm.train.trackers.config import TrackConfig

OPS = {"operational"}


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: corpus, tokenizer, format, validation split, reading."""
    corpus: str = knob(
        "shakespeare", doc="\"shakespeare\" (the embedded corpus) or a path: a "
        "text/JSONL (also .gz/.xz/.zst)/Parquet/Arrow/ArrayRecord file, a directory or glob "
        "of them, a Hugging Face save_to_disk directory, or a directory written by "
        "`lm data prepare` (lm/data/sources.py).")
    tokenizer: str = knob("byte", doc="\"byte\" | path to a SentencePiece .model | path to "
                                      "a Hugging Face tokenizer.json.")
    seq_len: int = knob(256, doc="Tokens per training row.")
    text_field: str = knob("text", doc="JSONL / Parquet column holding the document text.")
    on_bad_shard: Literal["fail", "skip"] = knob(
        "fail", doc="A corpus file that does not decode (bad gzip/zstd stream, invalid JSON "
        "line, not a parquet file): fail = one error naming it; skip = leave the whole file "
        "out, count it and warn once (lm/data/sources.py).")
    format: Literal["text", "instruction"] = knob(
        "text", doc="text: documents, every token a target; instruction: JSONL "
        "prompt/response records (or chat `messages`, with the tokenizer's chat template "
        "where it has one), the loss on response / assistant tokens only "
        "(lm/data/instruction.py).")
    prompt_field: str = knob("prompt", doc="instruction: the prompt's field.")
    response_field: str = knob("response", doc="instruction: the response's field.")
    validation_corpus: str = knob(
        "", doc="\"\" = split the corpus by document (see lm/data/sources.py).")
    sources: str = knob(
        "", doc="A weighted mixture instead of `corpus`: \"name:weight:path;...\" (each path "
        "as `corpus` takes it), e.g. \"plays:0.8:shakespeare;keys:0.2:passkey\" "
        "(lm/data/mixture.py). Validation loss is reported per source as well.")
    stages: str = knob(
        "", roles={"after_resume"},
        doc="Mixture weights by stage: \"until:name=w,...;...\", until a step or a fraction "
            "of `steps`, e.g. \"0.9:plays=0.8,keys=0.2;1.0:plays=0.5,keys=0.5\" (a cooldown "
            "mix for the last 10%). \"\" = the sources' weights throughout.")
    max_epochs: str = knob(
        "", roles={"after_resume"},
        doc="Per-source cap on epochs, \"name=K,...\": a source used up leaves the mixture.")
    preferences: str = knob(
        "", doc="objective=dpo|simpo|orpo: JSONL of preference pairs {\"prompt\": str (or "
        "\"messages\": the chat before the answer), \"chosen\": str, \"rejected\": str}, "
        "a pair per step row pair (lm/post/pairs.py); validation_fraction of them held out "
        "(or validation_corpus names a file of pairs).")
    validation_fraction: float = knob(0.1, doc="Share of the documents held out for "
                                               "validation when the corpus is split.")
    prefetch: int = knob(
        -1, roles=OPS,
        doc="Batches read and put on the devices ahead of the step by a thread (0 = none). "
            "-1 = auto: 2 on GPU/TPU; 0 on CPU, where the \"device\" is the host's own "
            "cores and a reading thread takes them from the step (see "
            "lm/data/prefetch.py: prefetch_depth).")
    read_threads: int = knob(0, roles=OPS, doc="Grain threads reading rows ahead (0 = in "
                                               "the prefetch thread).")
    seed: int = knob(
        -1, roles={"per_trial"},
        doc="Seed of the training data order; -1 = the run's `seed`. Fixing it while "
            "`seed` varies separates init noise from data-order noise in a seed study (and "
            "lets batched trials share one data stream: lm/train/trials.py).")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes within a slice (ICI) per axis, one may be -1 (fill with the
    remaining devices), times sizes across slices (DCN, multislice TPU pods)."""
    data: int = knob(-1, doc="Data-parallel ways; -1 = the devices the others leave.")
    fsdp: int = knob(1, doc="Fully sharded data-parallel ways (parameters sharded too).")
    expert: int = knob(1, doc="Expert parallelism (MoE layers); elsewhere it splits the "
                              "batch.")
    sequence: int = knob(1, doc="Sequence-parallel ways (activations split along the "
                                "sequence).")
    tensor: int = knob(1, doc="Tensor-parallel ways (heads, MLP width).")
    dcn_data: int = knob(1, doc="data ways across slices.")
    dcn_fsdp: int = knob(1, doc="fsdp ways across slices.")
    dcn_expert: int = knob(1, doc="expert ways across slices.")
    dcn_sequence: int = knob(1, doc="sequence ways across slices.")
    dcn_tensor: int = knob(1, doc="tensor ways across slices.")
    rules: str = knob("", doc="Overrides of the logical-axis rules, e.g. "
                              "\"embed=fsdp+tensor,vocab=\" (see lm/parallel/sharding.py for "
                              "the names and defaults).")
    sequence_attention: Literal["allgather", "ring"] = knob(
        "allgather", doc="Attention with the sequence sharded (sequence > 1): allgather = "
        "gather K/V along the sequence; ring = pass K/V blocks around the ring "
        "(lm/parallel/ring.py).")


@dataclass(frozen=True)
class TrainConfig:
    """A run: its sections, then the run-level knobs."""
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    mesh: MeshConfig = section(MeshConfig)
    lora: LoRAConfig = section(LoRAConfig)
    evals: TaskEvalConfig = section(TaskEvalConfig)
    track: TrackConfig = section(TrackConfig)
    distill: DistillConfig = section(DistillConfig)
    preference: PreferenceConfig = section(PreferenceConfig)
    sparsity: SparsityConfig = section(SparsityConfig)
    quant: QuantConfig = section(QuantConfig)
    rl: RLConfig = section(RLConfig)
    name: str = knob("run", roles={"operational", "per_trial"}, doc="The run's label.")
    seed: int = knob(0, roles={"traced"}, doc="Seed of the init (and, unless data.seed is "
                                             "set, of the data order).")
    objective: Literal["lm", "dpo", "simpo", "orpo"] = knob(
        "lm", doc="lm: next-token cross-entropy on data.corpus; dpo | simpo | orpo: "
                  "preference optimisation on data.preferences pairs (lm/post/preference.py; "
                  "dpo's reference is the initial policy: needs init_from, or lora.rank > 0).")
    init_from: str = knob(
        "", doc="Start from these weights (a run dir or a Hugging Face model dir) instead "
                "of a random init; the model section is the source's "
                "(lm/train/param_source.py).")
    steps: int = knob(1000, doc="Optimizer steps to train.")
    batch_size: int = knob(32, doc="Global batch, in sequences.")
    loss_chunk: int = knob(
        -1, doc="Cross-entropy over chunks of this many positions, so the [batch, seq, "
                "vocab] f32 logits never exist at once (lm/train/step.py). -1 = auto: 512 "
                "from a 32k vocabulary up, else whole; 0 = whole.")
    grad_accum: int = knob(1, doc="Microbatches per step (batch_size must divide).")
    log_every: int = knob(10, roles=OPS, doc="Steps between metric logs.")
    eval_every: int = knob(200, roles=OPS, doc="Steps between validation evaluations.")
    eval_batches: int = knob(8, roles=OPS, doc="0 = the whole validation split.")
    checkpoint_every: int = knob(500, roles=OPS, doc="Steps between checkpoints.")
    keep_checkpoints: int = knob(2, roles=OPS, doc="Checkpoints kept (older ones deleted).")
    tensorboard: bool = knob(True, roles=OPS, doc="Write TensorBoard scalars "
                             "(`RUN/tensorboard/`; other trackers: the track section).")
    stop_sync_every: int = knob(
        10, roles=OPS,
        doc="Multi-process runs agree on a SIGTERM/SIGINT every this many steps (a host "
            "barrier, no device sync) and all stop after the same step; one process stops "
            "at once.")

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed < 0 else self.data.seed


def keys_with_role(role: str) -> tuple[str, ...]:
    """Dotted keys of every TrainConfig field that declares `role` (lm/schema.py ROLES),
    plug-in sections included."""
    return schema.keys_with_role(TrainConfig, role)


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


def _set(node: Any, parts: list[str], raw: str, key: str) -> Any:
    fields = {e.name: e for e in schema.entries(type(node))}
    if len(parts) == 1 and (moved := schema.moved_keys(type(node)).get(parts[0])):
        for section_name, name in moved:  # an old flat key: set it where it lives now
            node = _set(node, [section_name, name], raw, key)
        return node
    if parts[0] not in fields:
        raise ConfigError(f"unknown config key '{key}'")
    e = fields[parts[0]]
    current = getattr(node, e.name)
    if e.is_section:
        if len(parts) == 1:
            raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
        return schema.replace(node, **{e.name: _set(current, parts[1:], raw, key)})
    if len(parts) > 1:
        raise ConfigError(f"unknown config key '{key}'")
    return schema.replace(node, **{e.name: _parse(raw, e.hint, key)})


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


def to_dict(cfg: Any) -> dict:
    """The config tree as nested dicts: every section, plug-in ones included."""
    return {e.name: (to_dict(getattr(cfg, e.name)) if e.is_section else getattr(cfg, e.name))
            for e in schema.entries(type(cfg))}


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _migrate_legacy(d: dict, cls: type) -> dict:
    """Move the flat keys of an earlier release's config.json into their sections."""
    legacy = schema.moved_keys(cls)
    if not legacy:
        return d
    names = {e.name for e in schema.entries(cls)}
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, targets in legacy.items():
        if old not in out or (old in names and isinstance(out[old], dict)):
            continue
        value = out.pop(old)
        for section, name in targets:
            out.setdefault(section, {}).setdefault(name, value)
    return out


def from_dict(d: dict, cls: type = TrainConfig, prefix: str = "") -> Any:
    fields = {e.name: e for e in schema.entries(cls)}
    kwargs = {}
    d = _migrate_legacy(d, cls)
    if hasattr(cls, "migrate"):  # a section that reads its older forms (e.g. Recursion)
        d = cls.migrate(d)
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}'")
        hint = fields[k].hint
        if dataclasses.is_dataclass(hint):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (object)")
            kwargs[k] = from_dict(v, hint, key + ".")
        else:
            kwargs[k] = _check_type(v, hint, key)
    plugins = {k: v for k, v in kwargs.items() if fields[k].plugin}
    node = cls(**{k: v for k, v in kwargs.items() if not fields[k].plugin})
    return schema.replace(node, **plugins) if plugins else node


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
    rope_scaling.validate(m)
    _mixers.validate(m)  # the layer patterns, then each mixer in use
    recursive.validate(m)
    # The mesh axes fixed in the config (a -1 axis is checked once devices fill it).
    _mixers.validate_mesh(m, {a: getattr(cfg.mesh, a) * getattr(cfg.mesh, f"dcn_{a}")
                              for a in MESH_AXES if getattr(cfg.mesh, a) > 0})
    if m.scan_layers and (len(set(m.mixer_pattern)) > 1 or len(set(m.channel_pattern)) > 1):
        raise ConfigError(f"model.scan_layers needs one mixer type per kind; mixer_pattern="
                          f"{m.mixer_pattern!r}, channel_pattern={m.channel_pattern!r} "
                          "(set model.scan_layers=false)")
    if m.scan_layers and any(_mixers.layer_configs(m, i) != _mixers.layer_configs(m, 0)
                             for i in range(m.n_layers)):
        raise ConfigError("model.scan_layers needs every layer configured alike; "
                          f"model.attention.window_pattern={m.attention.window_pattern!r} "
                          "differs by layer (set model.scan_layers=false)")
    if m.layernorm_scaling and m.norm_position == "out":
        raise ConfigError("model.layernorm_scaling scales the norms on a sublayer's input; "
                          "model.norm_position=out has none")
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
    _distill.validate(cfg.distill)
    _rl.validate(cfg.rl)
    _sparsity.validate(cfg.sparsity)
    if _sparsity.enabled(cfg.sparsity) and cfg.lora.rank:
        raise ConfigError("sparsity.mode and lora.rank: a LoRA run's base is frozen "
                          "(prune the merged model instead)")
    _preference.validate(cfg.preference)
    if cfg.objective != "lm":
        _validate_preference_run(cfg)
    elif d.preferences:
        raise ConfigError("data.preferences is set but objective=lm (set objective=dpo, "
                          "simpo or orpo)")
    _quant_rules.validate(cfg.quant, m.scan_layers)
    if cfg.quant.mode != "off" and cfg.distill.teacher:
        raise ConfigError("quant.mode=train does not combine with distillation yet")
    _mixture.check(cfg.data, cfg.steps)
    _task_config.validate(cfg.evals, cfg.eval_every)
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


def _validate_preference_run(cfg: TrainConfig) -> None:
    key = f"objective={cfg.objective}"
    if not cfg.data.preferences:
        raise ConfigError(f"{key} needs data.preferences (a JSONL of prompt/chosen/rejected "
                          "pairs)")
    if cfg.data.sources:
        raise ConfigError(f"{key} reads data.preferences; data.sources (a mixture) is not "
                          "supported with it")
    if cfg.distill.teacher:
        raise ConfigError(f"{key} with distillation (distill.teacher) is not supported")
    if _preference.needs_reference(cfg.objective) and not cfg.init_from and not cfg.lora.rank:
        raise ConfigError(f"{key} needs init_from (--init-from POLICY): the reference is the "
                          "initial policy (or a LoRA run's base)")
    if cfg.batch_size % 2 or (cfg.batch_size // 2) % cfg.grad_accum:
        raise ConfigError(f"{key}: batch_size={cfg.batch_size} rows hold pairs (chosen, "
                          f"rejected): it must be even, and its pairs divide by "
                          f"grad_accum={cfg.grad_accum}")


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
