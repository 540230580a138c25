"""The `evals` config section: downstream tasks at evaluation time (run by
lm/evals/downstream.py). Its own module so that lm/config.py imports only the schema,
not the harness."""

from __future__ import annotations

from dataclasses import dataclass

from lm.errors import ConfigError
from lm.schema import knob

OPS = {"operational"}


@dataclass(frozen=True)
class TaskEvalConfig:
    """Downstream tasks through lm-evaluation-harness at evaluation time
    (lm/evals/downstream.py)."""
    tasks: str = knob("", roles=OPS, doc="Comma-separated harness task names (or tags, e.g. "
                      "shakespeare: the embedded tasks), run at evaluation steps; \"\" = none.")
    every: int = knob(0, roles=OPS, doc="Steps between task evaluations (0 = every "
                      "eval_every); they also run at the last step.")
    num_fewshot: int = knob(-1, roles=OPS, doc="Examples in context; -1 = each task's own.")
    limit: int = knob(0, roles=OPS, doc="Documents per task; 0 = all.")
    batch_size: int = knob(8, roles=OPS, doc="Rows per harness forward.")
    include_path: str = knob("", roles=OPS, doc="A folder of harness YAML tasks (local data).")


def validate(cfg: TaskEvalConfig, eval_every: int) -> None:
    for key in ("every", "limit"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"evals.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"evals.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_fewshot < -1:
        raise ConfigError(f"evals.num_fewshot must be >= -1, got {cfg.num_fewshot}")
    if cfg.tasks and cfg.every and cfg.every % eval_every:
        raise ConfigError(f"evals.every ({cfg.every}) must be a multiple of eval_every "
                          f"({eval_every}): tasks run at evaluation steps")
