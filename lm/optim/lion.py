"""Lion's update direction (optim.name=lion, section optim.lion): the sign of an
interpolation between the momentum and the gradient (Chen et al. 2023, "Symbolic
Discovery of Optimization Algorithms"), optax.scale_by_lion. One moment: 4 bytes of state
per float32 parameter (AdamW: 8). Its updates are +-1 per entry, larger than Adam's, so
its best LR is typically 3-10x smaller and its weight decay as much larger."""

from __future__ import annotations

from dataclasses import dataclass

import optax

from lm.errors import ConfigError
from lm.optim.direction import Direction, register
from lm.schema import knob


@dataclass(frozen=True)
class LionConfig:
    """Lion's signed update direction (optim.name=lion)."""
    b1: float = knob(0.9, doc="Weight of the momentum in the signed interpolation.")
    b2: float = knob(0.99, doc="Decay of the momentum.")


@register
class Lion(Direction):
    name, Config = "lion", LionConfig

    @staticmethod
    def transform(section: LionConfig, axes_tree=None) -> optax.GradientTransformation:
        return optax.scale_by_lion(b1=section.b1, b2=section.b2)

    @staticmethod
    def validate(section: LionConfig) -> None:
        for key in ("b1", "b2"):
            if not 0 <= getattr(section, key) < 1:
                raise ConfigError(f"optim.lion.{key} must be in [0, 1), got {getattr(section, key)}")

    @staticmethod
    def mup_rule(section: LionConfig) -> str:
        # A sign update has entries of size 1 like Adam's (Adam with b1 = b2 = 0 is sign
        # descent), so Adam's muP rule carries over unchanged.
        return ("Adam-like (sign updates, entries of size 1): hidden-matrix LR x "
                "base_width/width (Tensor Programs V, Table 3, Adam column)")
