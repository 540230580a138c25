"""Where a run's metrics go: sinks behind one interface, registered by name.

A sink is opened once per run (re)start on process 0 (`open(run_dir, cfg, resume_step,
run_id)`), receives every record the run logs (`log(step, scalars, kind)`: the flat
scalars of one train or eval record, the names of metrics.jsonl; kind "train" | "eval"),
summary.json's fields when the run ends (`summary(dict)`), and is closed (`close()`).
lm/train/metrics.py (`MetricsSink`) opens every registered sink the config enables and
fans the records out to them.

Built in: `jsonl` (metrics.jsonl, always on: the results store reads it), `tensorboard`
(the `tensorboard` knob) and `wandb` (`track.wandb`). Another tracker (MLflow, ...) is
one file with a `Sink` subclass and one `register(...)` line, imported below (or by a
plug-in before the run starts); its knobs, if any, a section of `track`
(lm/train/trackers/config.py).

Failures: a sink registered `critical` (the local files) fails the run as any write
does (a full disk: exit 4). Any other sink's error (a tracker's network, its service)
never stops training: one line says so and that sink is off for the rest of the run.
A tracker that cannot work at all (its package missing) is refused before the run dir
exists by its `check(cfg)` (a ConfigError: exit 2).
"""

# The built-in sinks register themselves on import.
from lm.train.trackers import jsonl, tensorboard, wandb_run  # noqa: F401
from lm.train.trackers.base import (RUN_ID_FILE, Registration, Sink, check,  # noqa: F401
                                    register, registered, run_id, unregister)
