"""Sweep specs: a Python file whose `sweep()` (or `sweep(smoke=False, workdir=None)`)
returns a `Sweep`, and optionally a `prepare(workdir, smoke)` that `lm sweep` runs once
before the trials (`prepare_hook`): a multi-stage experiment (train a parent, prune it,
then heal the pruned models as trials) is still one `lm sweep` command.

A trial is the base config plus, in this order: `Sweep.overrides`, `Sweep.smoke` (only
with --smoke), the size's overrides, the arm's overrides, one value per axis, then
whatever `Sweep.derive(cfg, tags)` returns (e.g. steps from a compute budget). Trials
are the cartesian product sizes x arms x axis_1 x axis_2 ..., in that order, so the
expansion is deterministic. An axis key starting with "@" is a tag, not a config key:
it names the trial and is handed to `derive` (e.g. `Grid("@budget", [1e12, 3e12])`).

Every trial's config is validated (`apply_overrides` + `validate`) by `expand`; the first
invalid one raises ConfigError naming the trial and the key.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.configs import DEFAULT_CONFIG


# ----------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class Grid:
    """One key over a list of values."""
    key: str
    values: Sequence[Any]

    def points(self) -> list[dict]:
        return [{self.key: v} for v in self.values]


@dataclass(frozen=True)
class Zip:
    """Several keys stepped together: {key: values} with values of equal length."""
    values: Mapping[str, Sequence[Any]]

    def points(self) -> list[dict]:
        lengths = {k: len(v) for k, v in self.values.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"Zip axis: value lists differ in length ({lengths})")
        keys = list(self.values)
        return [dict(zip(keys, vals)) for vals in zip(*(self.values[k] for k in keys))]


@dataclass(frozen=True)
class LogUniform:
    """`n` values drawn log-uniformly from [low, high] with `seed` (reproducible), rounded
    to `digits` significant digits so names and values agree, sorted ascending."""
    key: str
    low: float
    high: float
    n: int
    seed: int = 0
    digits: int = 3

    def points(self) -> list[dict]:
        import random
        if not 0 < self.low < self.high:
            raise ConfigError(f"LogUniform {self.key}: need 0 < low < high")
        rng = random.Random(f"{self.key}:{self.seed}")
        lo, hi = math.log(self.low), math.log(self.high)
        vals = sorted(float(f"{math.exp(rng.uniform(lo, hi)):.{self.digits}g}")
                      for _ in range(self.n))
        return [{self.key: v} for v in vals]


def log_grid(low: float, high: float, n: int, digits: int = 2) -> list[float]:
    """n log-spaced values from low to high inclusive, rounded to `digits` significant."""
    if n == 1:
        return [low]
    r = (math.log(high) - math.log(low)) / (n - 1)
    return [float(f"{math.exp(math.log(low) + i * r):.{digits}g}") for i in range(n)]


# ----------------------------------------------------------------------------- sweep


@dataclass
class Sweep:
    """`base`: a TrainConfig, or a config file path (default: the shipped lm/configs/default.py).
    `overrides`: applied to the base for every trial (list of "key=value" or a dict).
    `axes`: Grid / Zip / LogUniform, crossed. `arms`: {name: overrides}, crossed.
    `sizes`: {name: model overrides} or [(name, overrides)], crossed (the size ladder).
    `smoke`: overrides applied with --smoke. `derive(cfg, tags) -> overrides`: per-trial
    overrides computed from the trial's config and its "@" tags.
    `seeds`: repeat every trial over these seeds (an int n: seeds 0..n-1), as the last
    axis (tag "seed"); `lm results` / `lm analyze` then report means with 95% intervals.
    `batch`: train up to this many compatible trials as one program (lm/train/trials.py;
    `lm sweep --batch` overrides it; 1 = each trial alone)."""
    base: TrainConfig | str | Path = str(DEFAULT_CONFIG)
    axes: list = field(default_factory=list)
    arms: Mapping[str, Mapping[str, Any]] | None = None
    sizes: Mapping[str, Mapping[str, Any]] | Sequence | None = None
    overrides: Sequence[str] | Mapping[str, Any] = ()
    smoke: Sequence[str] | Mapping[str, Any] = ()
    derive: Callable[[TrainConfig, dict], Mapping[str, Any]] | None = None
    seeds: int | Sequence[int] = ()
    batch: int = 1

    def seed_values(self) -> list[int]:
        if isinstance(self.seeds, int):
            if self.seeds < 0:
                raise ConfigError(f"Sweep.seeds must be >= 0, got {self.seeds}")
            return list(range(self.seeds))
        return [int(s) for s in self.seeds]


@dataclass
class Trial:
    name: str
    overrides: list[str]       # "key=value", in application order
    tags: dict                 # arm, size and every axis value (for names and analysis)

    def to_dict(self) -> dict:
        return {"name": self.name, "overrides": self.overrides, "tags": self.tags}


def format_value(v: Any) -> str:
    """Override / name text of a value: bools lower case, floats short (1e-3, 0.5)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if not math.isfinite(v):
            return repr(v)
        if 1e-2 <= abs(v) < 1e4:
            return f"{v:.6g}"
        mant, exp = f"{v:.6e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return str(v)


def _as_overrides(o: Sequence[str] | Mapping[str, Any] | None, what: str) -> list[str]:
    if not o:
        return []
    if isinstance(o, Mapping):
        return [f"{k}={format_value(v)}" for k, v in o.items()]
    if isinstance(o, str):
        raise ConfigError(f"{what}: expected a list of key=value strings or a dict, got a str")
    return [str(x) for x in o]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


def short_names(keys: list[str]) -> dict[str, str]:
    """Last dotted component of each key, or the whole key where that is ambiguous."""
    last = [k.lstrip("@").split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.lstrip("@")) for k, s in zip(keys, last)}


def _sizes(sizes) -> list[tuple[str, dict]]:
    if not sizes:
        return []
    items = sizes.items() if isinstance(sizes, Mapping) else sizes
    return [(str(name), ov) for name, ov in items]


def base_config(sweep: Sweep) -> TrainConfig:
    if isinstance(sweep.base, TrainConfig):
        return sweep.base
    return config_lib.load_config_file(sweep.base)


def expand(sweep: Sweep, *, smoke: bool = False) -> list[Trial]:
    """Every trial of the sweep, in a fixed order, each validated."""
    if not isinstance(sweep, Sweep):
        raise ConfigError("sweep() must return an lm.sweep.Sweep")
    base = base_config(sweep)
    common = _as_overrides(sweep.overrides, "Sweep.overrides")
    if smoke:
        common += _as_overrides(sweep.smoke, "Sweep.smoke")
    sizes = _sizes(sweep.sizes)
    arms = list((sweep.arms or {}).items())
    axes = list(sweep.axes)
    if sweep.seed_values():
        if any("seed" in p for ax in axes for p in ax.points()):
            raise ConfigError("Sweep.seeds and an axis over seed: use one of them")
        axes.append(Grid("seed", sweep.seed_values()))
    axis_points = [ax.points() for ax in axes]
    for ax, pts in zip(axes, axis_points):
        if not pts:
            raise ConfigError(f"sweep axis {ax!r} has no values")
    axis_keys = list(dict.fromkeys(k for pts in axis_points for p in pts for k in p))
    short = short_names(axis_keys)

    trials, seen = [], {}
    for size in (sizes or [None]):
        for arm in (arms or [None]):
            for combo in itertools.product(*axis_points):
                tags, parts, ov = {}, [], list(common)
                if arm is not None:
                    tags["arm"] = arm[0]
                    parts.append(f"arm={arm[0]}")
                if size is not None:
                    tags["size"] = size[0]
                    parts.append(f"size={size[0]}")
                    ov += _as_overrides(size[1], f"size {size[0]}")
                if arm is not None:
                    ov += _as_overrides(arm[1], f"arm {arm[0]}")
                for point in combo:
                    for k, v in point.items():
                        tags[k.lstrip("@")] = v
                        parts.append(f"{short[k]}={format_value(v)}")
                        if not k.startswith("@"):
                            ov.append(f"{k}={format_value(v)}")
                name = _safe(",".join(parts)) or "base"
                try:
                    cfg = config_lib.apply_overrides(base, ov)
                    if sweep.derive is not None:
                        extra = _as_overrides(sweep.derive(cfg, dict(tags)), "derive()")
                        ov += extra
                        cfg = config_lib.apply_overrides(cfg, extra)
                    config_lib.validate(cfg)
                except ConfigError as e:
                    raise ConfigError(f"trial {name}: {e}") from None
                if name in seen:
                    raise ConfigError(f"two trials are named {name} (duplicate axis values?)")
                seen[name] = True
                trials.append(Trial(name=name, overrides=ov, tags=tags))
    return trials


def load_spec(path: str | Path, *, smoke: bool = False, workdir: str | Path | None = None) -> Sweep:
    """Run the spec file's sweep() (passing smoke= and workdir= where it takes them: a
    spec whose trials start from what its `prepare` wrote reads it from the workdir)."""
    path = Path(path)
    module = config_lib.exec_python_file(path, "sweep spec")
    fn = getattr(module, "sweep", None)
    if fn is None:
        raise ConfigError(f"sweep spec {path} defines no sweep() function")
    params = inspect.signature(fn).parameters
    kwargs = {"smoke": smoke} if "smoke" in params else {}
    if "workdir" in params:
        kwargs["workdir"] = Path(workdir) if workdir is not None else None
    sweep = fn(**kwargs)
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"sweep() in {path} must return an lm.sweep.Sweep")
    return sweep


def prepare_hook(path: str | Path) -> Callable[..., None] | None:
    """The spec file's `prepare(workdir, smoke)`, if it has one: work its trials need
    before they run (a parent to prune, say), done once by `lm sweep` under the
    workdir's lock before the trials are expanded. It must skip what it finished before,
    so a re-run of the sweep resumes it."""
    module = config_lib.exec_python_file(Path(path), "sweep spec")
    fn = getattr(module, "prepare", None)
    if fn is not None and not callable(fn):
        raise ConfigError(f"sweep spec {path}: prepare must be a function")
    return fn
