"""The `track` config section: the experiment trackers a run logs to beside metrics.jsonl
(lm/train/trackers). Its own module, importing only the schema, so that lm/config.py
composes it without importing a tracker. A tracker that brings knobs of its own (an
MLflow sink's tracking URI) registers them as a section of this one:
`lm.schema.register_section("track", "mlflow", MlflowConfig)` -> `track.mlflow.<knob>`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from lm.schema import Composed, knob

OPS = {"operational"}


@dataclass(frozen=True)
class TrackConfig(Composed):
    """Experiment trackers beside metrics.jsonl and TensorBoard (lm/train/trackers)."""
    section_group: ClassVar[str] = "track"
    wandb: bool = knob(False, roles=OPS, doc="Log to Weights & Biases (needs the `wandb` "
                       "package: `pip install 'lmlab[wandb]'`): the config, train/ and eval/ "
                       "scalars, summary.json at the end; a resumed run continues the same "
                       "W&B run (its id: `RUN/run_id`). Its files go under `RUN/wandb/`.")
    project: str = knob("lmlab", roles=OPS, doc="The tracker's project.")
    entity: str = knob("", roles=OPS, doc="W&B entity (team or user); \"\" = the "
                       "logged-in default.")
    group: str = knob("", roles=OPS, doc="Group of runs (e.g. a sweep's name); \"\" = none.")
    tags: str = knob("", roles=OPS, doc="Comma-separated tags.")
    mode: Literal["auto", "online", "offline", "disabled"] = knob(
        "auto", roles=OPS, doc="W&B mode; auto = W&B's own choice (WANDB_MODE if set, else "
        "online). offline: everything stays under `RUN/wandb/` (`wandb sync` uploads it).")

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]
