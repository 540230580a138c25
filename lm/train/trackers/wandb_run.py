"""Weights & Biases (`track.wandb=true`): one W&B run per lmlab run, its id the run's
(<run>/run_id), so a resumed run continues the same W&B run (`resume="allow"`); its
files under <run>/wandb/, never the working directory.

What it logs: the whole config (nested, as config.json), every train and eval record
as train/<name> and eval/<name> (the names of metrics.jsonl; downstream task scores are
eval/tasks/<task>/<metric>) against a `step` metric, and summary.json's fields at the
end. The x axis is `step`, not W&B's own `_step`: a run resumed from an older checkpoint
than its last record (a hard kill) re-does steps, and W&B's `_step` may never go back,
so those records would be dropped; with `step` they are kept (the re-done steps show
twice; metrics.jsonl keeps the second)."""

from __future__ import annotations

from pathlib import Path

from lm.errors import ConfigError
from lm.train.trackers.base import Sink, register


def check(cfg) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"track.wandb=true needs the wandb package ({e}): "
                          "pip install 'lmlab[wandb]'") from None


class WandbSink(Sink):

    def open(self, run_dir, cfg, resume_step, run_id):
        import wandb

        from lm import config as config_lib
        t = cfg.track
        self.run = wandb.init(
            id=run_id, resume="allow", dir=str(Path(run_dir)), name=cfg.name,
            project=t.project or None, entity=t.entity or None, group=t.group or None,
            tags=t.tag_list or None,
            mode=None if t.mode == "auto" else t.mode,  # None: WANDB_MODE, else online
            config=config_lib.to_dict(cfg), reinit="create_new",  # batched trials: K runs
            settings=wandb.Settings(console="off"))  # lmlab's lines stay as they are
        self.run.define_metric("step")
        for kind in ("train", "eval"):
            self.run.define_metric(f"{kind}/*", step_metric="step")
        self.exit_code = 1  # until a summary says how the run ended

    def log(self, step, scalars, kind):
        self.run.log({"step": step, **{f"{kind}/{k}": v for k, v in scalars.items()}})

    def summary(self, summary):
        self.run.summary.update(summary)
        status = str(summary.get("status", ""))
        self.exit_code = 0 if status in ("completed", "interrupted") else 1

    def close(self):
        self.run.finish(exit_code=self.exit_code)


register("wandb", WandbSink, enabled=lambda cfg: cfg.track.wandb, check=check)
