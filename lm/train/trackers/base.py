"""The sink interface and registry of lm/train/trackers (see its doc)."""


from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from lm.config import TrainConfig


class Sink:
    """One destination of a run's records. Subclasses override what they need."""

    def open(self, run_dir: Path, cfg: "TrainConfig", resume_step: int, run_id: str) -> None:
        """Start (or, `resume_step` > 0, continue) the run `run_id` of `run_dir`. A
        resumed run re-does the steps after `resume_step`: their records come again."""

    def log(self, step: int, scalars: dict[str, float], kind: str) -> None:
        """One record: `scalars` flat {name: float} (maybe non-finite); kind "train" |
        "eval"."""

    def summary(self, summary: dict) -> None:
        """summary.json's fields as the run ends (its status included)."""

    def close(self) -> None:
        """Flush and release; called once, whatever happened."""


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[[], Sink]
    enabled: Callable[["TrainConfig"], bool]
    check: Callable[["TrainConfig"], None] | None = None  # raises ConfigError
    critical: bool = False  # its errors fail the run (local files) instead of turning it off


_SINKS: dict[str, Registration] = {}


def register(name: str, factory: Callable[[], Sink], *,
             enabled: Callable[["TrainConfig"], bool],
             check: Callable[["TrainConfig"], None] | None = None,
             critical: bool = False) -> None:
    """Add sink `name`: `factory()` builds one per run, when `enabled(cfg)`; `check(cfg)`
    refuses a config it cannot serve (before the run dir exists)."""
    if name in _SINKS and _SINKS[name].factory is not factory:
        raise ValueError(f"sink {name!r} is registered twice")
    _SINKS[name] = Registration(name, factory, enabled, check, critical)


def unregister(name: str) -> None:
    _SINKS.pop(name, None)


def registered() -> dict[str, Registration]:
    """The sinks by name, in registration order."""
    return dict(_SINKS)


def check(cfg: "TrainConfig") -> None:
    """Each enabled sink's check of `cfg` (ConfigError: one line, exit 2)."""
    for reg in _SINKS.values():
        if reg.check is not None and reg.enabled(cfg):
            reg.check(cfg)


RUN_ID_FILE = "run_id"
_ID_CHARS = string.ascii_lowercase + string.digits


def run_id(run_dir: Path) -> str:
    """The run's tracker id: made once (8 lowercase letters and digits, as W&B's own)
    and kept in <run_dir>/run_id, so a resumed run continues the same tracked run."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists() and (text := path.read_text().strip()):
        return text
    new = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    path.write_text(new + "\n")
    return new

