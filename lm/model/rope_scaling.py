"""RoPE scaling (model.rope_scaling): the inverse frequencies of linear position
interpolation, NTK-aware scaling, YaRN and Llama 3's scaling, as Hugging Face
transformers' modeling_rope_utils computes them (same names and semantics, so that an
imported checkpoint's `rope_scaling` maps onto these knobs one to one):

  linear  inv_freq / factor (Chen et al. 2023, position interpolation).
  ntk     base -> base * factor^(d / (d - 2)) (NTK-aware; HF's "ntk": the dynamic
          variant's length-dependent term fixed at `factor`).
  yarn    per frequency, a linear ramp between interpolation (inv_freq / factor) for
          wavelengths longer than the context and extrapolation (inv_freq) for short
          ones, the ramp's ends at beta_fast / beta_slow rotations over
          original_max_seq_len (Peng et al. 2023); sin and cos are multiplied by
          attention_factor (0 = 0.1 ln(factor) + 1), which scales the logits by its
          square. HF sets factor = max_position_embeddings / original when a checkpoint
          names both; here `factor` is used as given (an importer passes the ratio).
  llama3  wavelengths above original_max_seq_len / low_freq_factor divided by factor,
          below original_max_seq_len / high_freq_factor kept, a smooth blend between.

Everything here is host-side numpy on structural config values (not swept, not traced):
the frequencies are constants of the compiled program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from lm.errors import ConfigError
from lm.schema import knob

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

# Context extension: the positions the model sees change, its parameters do not; every
# knob here is free under --init-from and settable at evaluation time.
_FREE = {"free_init", "eval_time"}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling for longer contexts, with Hugging Face's `rope_scaling` names and
    semantics (formulas: lm/model/rope_scaling.py)."""
    type: Literal["none", "linear", "ntk", "yarn", "llama3"] = knob(
        "none", roles=_FREE, doc="The scaling method (none = plain RoPE).")
    factor: float = knob(1.0, roles=_FREE, doc="The context extension factor.")
    original_max_seq_len: int = knob(
        0, roles=_FREE, doc="HF original_max_position_embeddings; 0 = max_seq_len.")
    low_freq_factor: float = knob(1.0, roles=_FREE, doc="llama3: low-frequency factor.")
    high_freq_factor: float = knob(4.0, roles=_FREE, doc="llama3: high-frequency factor.")
    beta_fast: float = knob(32.0, roles=_FREE, doc="yarn: ramp end (rotations), fast side.")
    beta_slow: float = knob(1.0, roles=_FREE, doc="yarn: ramp end (rotations), slow side.")
    attention_factor: float = knob(
        0.0, roles=_FREE, doc="yarn mscale; 0 = HF's default 0.1 * ln(factor) + 1.")


def default_inv_freq(d: int, theta: float) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)


def inv_freq(d: int, theta: float, s: "RopeScaling | None", max_seq_len: int) -> np.ndarray:
    """[d/2] float64 inverse frequencies for head dim d under scaling `s` (None: plain)."""
    base = default_inv_freq(d, theta)
    kind = "none" if s is None else s.type
    if kind == "none":
        return base
    if kind == "linear":
        return base / s.factor
    if kind == "ntk":
        return default_inv_freq(d, theta * s.factor ** (d / (d - 2)))
    original = s.original_max_seq_len or max_seq_len
    if kind == "yarn":
        def correction_dim(rotations: float) -> float:
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(correction_dim(s.beta_fast)), 0)
        high = min(math.ceil(correction_dim(s.beta_slow)), d - 1)
        if low == high:
            high += 0.001  # HF: prevent a division by zero
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp.astype(np.float64)
        return base / s.factor * (1 - extrapolation) + base * extrapolation
    if kind == "llama3":
        low_wavelen = original / s.low_freq_factor
        high_wavelen = original / s.high_freq_factor
        wavelen = 2 * math.pi / base
        scaled = np.where(wavelen > low_wavelen, base / s.factor, base)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling {kind!r}")


def attention_factor(s: "RopeScaling | None") -> float:
    """The multiplier of sin and cos (YaRN's mscale; 1 for the other kinds)."""
    if s is None or s.type != "yarn":
        return 1.0
    if s.attention_factor:
        return float(s.attention_factor)
    return 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0


def validate(m: "ModelConfig") -> None:
    s = m.rope_scaling
    key = "model.rope_scaling"
    if s.type == "none":
        return
    if not s.factor >= 1:
        raise ConfigError(f"{key}.factor must be >= 1 for type={s.type}, got {s.factor}")
    if s.original_max_seq_len < 0:
        raise ConfigError(f"{key}.original_max_seq_len must be >= 0, got {s.original_max_seq_len}")
    if s.type == "llama3":
        if not s.original_max_seq_len:
            raise ConfigError(f"{key}.original_max_seq_len must be set (> 0) for type=llama3 "
                              "(the pre-trained context length)")
        if not 0 < s.low_freq_factor < s.high_freq_factor:
            raise ConfigError(f"{key}: type=llama3 needs 0 < low_freq_factor < high_freq_factor, "
                              f"got {s.low_freq_factor} and {s.high_freq_factor}")
    if s.type == "yarn":
        if not 0 < s.beta_slow < s.beta_fast:
            raise ConfigError(f"{key}: type=yarn needs 0 < beta_slow < beta_fast, got "
                              f"beta_slow={s.beta_slow}, beta_fast={s.beta_fast}")
        if s.attention_factor < 0:
            raise ConfigError(f"{key}.attention_factor must be >= 0 (0 = 0.1 ln(factor) + 1), "
                              f"got {s.attention_factor}")
