"""The optimizer plug-in seam: `Direction` (an update direction: its config section,
its optax transform, its muP rule) and `register`, which makes it selectable by
optim.name and gives every config its `optim.<name>` section (lm/schema.py), whenever
the file is imported. What muP calls a hidden matrix is decided here too."""

from __future__ import annotations

from typing import Any, ClassVar

import optax

from lm import schema


# Axes along which a parameter is a stack of independent blocks, not one matrix.
BLOCK_AXES = ("layers", "experts")


def is_hidden_matrix(axes: tuple[str, ...]) -> bool:
    """Matrices whose fan-in grows with width: everything >= 2-D (per layer and expert)
    but the vocab tables and depthwise convolutions (Mamba-2's [conv, channels] kernel has
    a fixed fan-in, the conv width: muP treats it like a vector of per-channel gains)."""
    axes = tuple(a for a in axes if a not in BLOCK_AXES)
    return len(axes) >= 2 and "vocab" not in axes and "conv" not in axes



class Direction:
    """An update direction (subclass, set the class attributes, `@register` it)."""
    name: ClassVar[str]
    Config: ClassVar[type]

    # True: mup_lr_scale needs each parameter's size at the base width (size_ratio).
    mup_needs_sizes: ClassVar[bool] = False

    @staticmethod
    def transform(section, axes_tree: Any) -> optax.GradientTransformation:
        raise NotImplementedError

    @staticmethod
    def validate(section) -> None:
        """Raise ConfigError (one line naming optim.<name>.<key>) for bad settings."""

    @staticmethod
    def mup_rule(section) -> str | None:
        """The muP LR rule, in one line with its source; None: none for these settings."""
        return None

    @staticmethod
    def mup_lr_scale(width_ratio: float, axes: tuple[str, ...], section,
                     size_ratio: float | None = None) -> float:
        """LR multiplier under muP of a parameter with these logical axes, at
        base_width / width = width_ratio (size_ratio: its element count at the base width
        over its count now, for directions with mup_needs_sizes). Adam-like default:
        hidden matrices x width_ratio, everything else 1."""
        return width_ratio if is_hidden_matrix(axes) else 1.0


DIRECTIONS: dict[str, type[Direction]] = {}


def register(cls):
    if cls.name in DIRECTIONS:
        raise ValueError(f"optimizer {cls.name!r} is registered twice")
    schema.register_section("optim", cls.name, cls.Config)  # (refuses a non-frozen Config)
    DIRECTIONS[cls.name] = cls
    return cls


def all_directions() -> list[type[Direction]]:
    return list(DIRECTIONS.values())
