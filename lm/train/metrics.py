"""Where metrics go: metrics.jsonl, TensorBoard event files and a console line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _scalars(metrics: dict) -> dict[str, float]:
    """Flatten to scalars: a per-layer vector m, or a {layer: value} dict of some
    layers, becomes m/0, m/1, ...; a {layer: vector} dict (e.g. per-expert load)
    m/<layer>/0, m/<layer>/1, ..."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_scalars({f"{k}/{i}": x for i, x in v.items()}))
            continue
        arr = np.asarray(v)
        if arr.ndim == 0:
            out[k] = float(arr)
        else:
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(arr.reshape(-1))})
    return out


class MetricsSink:
    """Writes nothing when not enabled (only process 0 of a multi-host job writes)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int = 0,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = EventFileWriter(str(run_dir / "tensorboard")) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """A resumed run re-does the steps after its checkpoint: drop their old records
        so metrics.jsonl reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        scalars = _scalars(metrics)
        record = {"step": step, "kind": kind, **{
            k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            summary = Summary(value=[Summary.Value(tag=f"{kind}/{k}", simple_value=v)
                                     for k, v in scalars.items()])
            self.tb.add_event(Event(wall_time=time.time(), step=step, summary=summary))
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One console line per log interval: step, loss, tokens/s, MFU and ETA."""

    def __init__(self, total_steps: int, stream=None, enabled: bool = True):
        self.total = total_steps
        self.stream = stream
        self.enabled = enabled

    def line(self, step: int, loss: float, tokens_per_s: float, mfu: float,
             step_time: float, extra: str = "") -> None:
        if not self.enabled:
            return
        eta = (self.total - step) * step_time
        width = 20
        done = int(width * step / self.total)
        bar = "#" * done + "." * (width - done)
        msg = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | "
               f"{tokens_per_s:,.0f} tok/s | mfu {100 * mfu:.1f}% | eta {_duration(eta)}")
        print(msg + (f" | {extra}" if extra else ""), file=self.stream or sys.stdout, flush=True)
