"""TensorBoard event files under <run>/tensorboard/: the scalars of metrics.jsonl as
train/<name> and eval/<name> (the `tensorboard` knob)."""

from __future__ import annotations

import time
from pathlib import Path

from lm.train.trackers.base import Sink, register


class TensorBoardSink(Sink):

    def open(self, run_dir, cfg, resume_step, run_id):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.writer = EventFileWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step, scalars, kind):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=f"{kind}/{k}", simple_value=v)
                                 for k, v in scalars.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()

    def close(self):
        self.writer.close()


register("tensorboard", TensorBoardSink, enabled=lambda cfg: cfg.tensorboard, critical=True)
