"""Adafactor's update direction (optim.name=adafactor, section optim.adafactor; Shazeer &
Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"), built from
optax's pieces in the order of optax.adafactor: factored second-moment scaling
(optax.scale_by_factored_rms: a matrix keeps one row and one column statistic instead of
a full second moment, the memory-saving choice for large models), update clipping by
block RMS, optionally the relative step (x the parameter's RMS) and momentum.

The shared chain applies the LR after this direction; optax.adafactor applies it before
the momentum, so with momentum and a changing LR the two differ by when the LR enters
the average (equal at a constant LR: tests/test_optimizers.py)."""

from __future__ import annotations

from dataclasses import dataclass

import optax

from lm.errors import ConfigError
from lm.optim.direction import Direction, register
from lm.schema import knob


@dataclass(frozen=True)
class AdafactorConfig:
    """Adafactor's factored second moments (optim.name=adafactor)."""
    decay_rate: float = knob(0.8, doc="Second-moment decay 1 - (t+1)^-decay_rate.")
    eps: float = knob(1e-30, doc="Added to the squared gradients.")
    clipping_threshold: float = knob(1.0, doc="Updates are clipped to this block RMS.")
    factored: bool = knob(True, doc="Row and column statistics for matrices (else full).")
    min_dim_size_to_factor: int = knob(128, doc="Dimensions below this keep a full statistic.")
    momentum: bool = knob(False, doc="A first moment (b1) at 4 more bytes per parameter.")
    b1: float = knob(0.9, doc="Decay of the first moment (with momentum).")
    multiply_by_parameter_scale: bool = knob(
        False, doc="Relative step: multiply updates by the parameter block's RMS "
                   "(Adafactor's default in the paper); lmlab has no muP rule for it.")


@register
class Adafactor(Direction):
    name, Config = "adafactor", AdafactorConfig

    @staticmethod
    def transform(section: AdafactorConfig, axes_tree=None) -> optax.GradientTransformation:
        parts = [optax.scale_by_factored_rms(
                     factored=section.factored, decay_rate=section.decay_rate,
                     min_dim_size_to_factor=section.min_dim_size_to_factor,
                     epsilon=section.eps),
                 optax.clip_by_block_rms(section.clipping_threshold)]
        if section.multiply_by_parameter_scale:
            parts.append(optax.scale_by_param_block_rms())
        if section.momentum:
            parts.append(optax.ema(section.b1, debias=False))
        return optax.chain(*parts)

    @staticmethod
    def validate(section: AdafactorConfig) -> None:
        if not 0 <= section.b1 < 1:
            raise ConfigError(f"optim.adafactor.b1 must be in [0, 1), got {section.b1}")
        if not 0 < section.decay_rate <= 1:
            raise ConfigError(f"optim.adafactor.decay_rate must be in (0, 1], got {section.decay_rate}")
        if section.clipping_threshold <= 0:
            raise ConfigError("optim.adafactor.clipping_threshold must be positive, got "
                              f"{section.clipping_threshold}")
        if section.eps < 0:
            raise ConfigError(f"optim.adafactor.eps must be >= 0, got {section.eps}")
        if section.min_dim_size_to_factor < 1:
            raise ConfigError("optim.adafactor.min_dim_size_to_factor must be >= 1, got "
                              f"{section.min_dim_size_to_factor}")

    @staticmethod
    def mup_rule(section: AdafactorConfig) -> str | None:
        if section.multiply_by_parameter_scale:
            # The relative step makes the update scale with the weights' RMS, which muP's
            # init already shrinks with width: a different rule, not worked out here.
            return None
        # Dividing by a (factored) RMS of the gradient normalises entries like Adam does.
        return ("Adam-like (RMS-normalised updates): hidden-matrix LR x base_width/width "
                "(Tensor Programs V, Table 3, Adam column)")
