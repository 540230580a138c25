"""Model knobs an evaluation may change without retraining: they do not change the
parameters, only how the trained ones are applied (LM-Infinite's Λ mask = a window with
sink tokens, RoPE scaling, the length the model is built for)."""

from __future__ import annotations

import dataclasses

from lm import schema
from lm.config import ConfigError, TrainConfig, apply_overrides, keys_with_role


def eval_time_keys() -> tuple[str, ...]:
    """The knobs declared with the role "eval_time" (plug-in sections included)."""
    return keys_with_role("eval_time")


def _shown(keys: tuple[str, ...]) -> str:
    """The keys, a section whose every knob is allowed shown once as `section.*`."""
    per_section: dict[str, int] = {}
    for key, _ in schema.walk(TrainConfig):
        per_section[key.rpartition(".")[0]] = per_section.get(key.rpartition(".")[0], 0) + 1
    out: list[str] = []
    for key in keys:
        sec = key.rpartition(".")[0]
        whole = sum(k.rpartition(".")[0] == sec for k in keys) == per_section[sec]
        shown = f"{sec}.*" if whole and sec.count(".") > 1 else key
        if shown not in out:
            out.append(shown)
    return ", ".join(out)


def check_keys(overrides: list[str]) -> None:
    """ConfigError unless every `KEY=VALUE` names an evaluation-time knob."""
    allowed = eval_time_keys()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in allowed:
            raise ConfigError(f"--set {key}: not an evaluation-time knob (allowed: "
                              f"{_shown(allowed)})")


def eval_time_config(cfg: TrainConfig, overrides: list[str], length: int = 0) -> TrainConfig:
    """`cfg` with eval-time `--set` overrides and, for `length` > 0, built for rows of
    that length (data.seq_len; model.max_seq_len raised to it if shorter). Raising
    max_seq_len keeps a YaRN / Llama-3 scaling's original length at the trained one
    (data.seq_len) unless it is set."""
    check_keys(overrides)
    trained_len = cfg.data.seq_len  # the length the run was trained at
    cfg = apply_overrides(cfg, overrides)
    m = cfg.model
    if m.rope_scaling.type in ("yarn", "llama3") and not m.rope_scaling.original_max_seq_len:
        m = dataclasses.replace(m, rope_scaling=dataclasses.replace(
            m.rope_scaling, original_max_seq_len=trained_len))
    if length:
        m = dataclasses.replace(m, max_seq_len=max(m.max_seq_len, length))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=length))
    return dataclasses.replace(cfg, model=m)


def eval_time_pieces(run, overrides: list[str], length: int = 0):
    """The RunPieces of a restored run with eval-time overrides (and rows of `length`),
    on the run's mesh; the run's parameters fit them unchanged."""
    from lm.config import validate
    from lm.train.state import build
    return build(validate(eval_time_config(run.cfg, overrides, length)), run.pieces.mesh)


def eval_time_graphdef(run, overrides: list[str]):
    """(graphdef, config) of a restored run with eval-time overrides (the run's own
    without any)."""
    if not overrides:
        return run.pieces.graphdef, run.cfg
    pieces = eval_time_pieces(run, overrides)
    return pieces.graphdef, pieces.cfg
