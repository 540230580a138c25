"""Adam's update direction (optim.name=adamw, section optim.adamw); the shared chain in
lm/optim adds clipping, the schedule, muP multipliers and (decoupled) weight decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import optax

from lm.errors import ConfigError
from lm.optim.direction import Direction, register
from lm.schema import knob


@dataclass(frozen=True)
class AdamWConfig:
    """Adam's update direction (optim.name=adamw)."""
    b1: float = knob(0.9, roles={"traced"}, doc="Decay of the first moment.")
    b2: float = knob(0.95, roles={"traced"}, doc="Decay of the second moment.")
    eps: float = knob(1e-8, roles={"traced"}, doc="Added to the second moment's root.")

    legacy: ClassVar[dict[str, str]] = {"b1": "b1", "b2": "b2", "eps": "eps"}


@register
class AdamW(Direction):
    name, Config = "adamw", AdamWConfig

    @staticmethod
    def transform(section: AdamWConfig, axes_tree=None) -> optax.GradientTransformation:
        return optax.scale_by_adam(b1=section.b1, b2=section.b2, eps=section.eps)

    @staticmethod
    def mup_rule(section: AdamWConfig) -> str:
        # Adam's update has entries of size ~1 whatever the width, so a hidden matrix's
        # effect on its output grows with fan-in unless its LR shrinks as 1/width.
        return ("Adam: hidden-matrix LR x base_width/width, vectors and embeddings x 1 "
                "(Yang et al. 2022, Tensor Programs V, Table 3)")

    @staticmethod
    def validate(section: AdamWConfig) -> None:
        for key in ("b1", "b2"):
            if not 0 <= getattr(section, key) < 1:
                raise ConfigError(f"optim.adamw.{key} must be in [0, 1), got {getattr(section, key)}")
        if section.eps < 0:
            raise ConfigError(f"optim.adamw.eps must be >= 0, got {section.eps}")
