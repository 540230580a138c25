"""metrics.jsonl: one JSON record per log step and per evaluation (always on: the results
store, lm.analysis.load, reads it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lm.train.trackers.base import Sink, register

FILE = "metrics.jsonl"


class JsonlSink(Sink):

    def open(self, run_dir, cfg, resume_step, run_id):
        self.path = Path(run_dir) / FILE
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-does the steps after its checkpoint: drop their old records
        so metrics.jsonl reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step, scalars, kind):
        record = {"step": step, "kind": kind, **{
            k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


register("jsonl", JsonlSink, enabled=lambda cfg: True, critical=True)
