"""Where metrics go: the sinks of lm/train/trackers (metrics.jsonl, TensorBoard, W&B, ...)
and a console line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from lm.train import trackers
from lm.train.trackers import jsonl


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
    """A run's records fanned out to every sink its config enables (lm/train/trackers:
    metrics.jsonl always, TensorBoard, W&B, ...). Writes nothing when not enabled (only
    process 0 of a multi-host job writes). A non-critical sink that fails is turned off
    with one line; a critical one's error (a local file's) is the run's."""

    def __init__(self, run_dir: Path, cfg, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / jsonl.FILE
        self.sinks: list[tuple[trackers.Registration, trackers.Sink]] = []
        if not enabled:
            return
        rid = trackers.run_id(run_dir)
        for reg in trackers.registered().values():
            if not reg.enabled(cfg):
                continue
            sink = reg.factory()
            self.sinks.append((reg, sink))
            if not self._call(reg, sink, "open", Path(run_dir), cfg, resume_step, rid):
                self.sinks.pop()

    def _call(self, reg, sink, method: str, *args) -> bool:
        """sink.method(*args); False when a non-critical sink failed (it is then off)."""
        if reg.critical:
            getattr(sink, method)(*args)
            return True
        try:
            getattr(sink, method)(*args)
            return True
        except Exception as e:  # noqa: BLE001 (a tracker never stops training)
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"warning: the {reg.name} tracker failed ({type(e).__name__}: {first}); "
                  "it is off for the rest of this run", flush=True)
            return False

    def _each(self, method: str, *args) -> None:
        self.sinks = [(reg, sink) for reg, sink in self.sinks
                      if self._call(reg, sink, method, *args) or reg.critical]

    def write(self, step: int, metrics: dict, kind: str = "train") -> None:
        if self.enabled:
            self._each("log", step, _scalars(metrics), kind)

    def close(self, summary: dict | None = None) -> None:
        """Give each sink `summary` (summary.json's fields as the run ends; None: the run
        failed before they were known), then close them all; the first error of a
        critical sink is raised once every sink is closed."""
        if not self.enabled:
            return
        if summary is not None:
            self._each("summary", summary)
        failure = None
        for reg, sink in self.sinks:
            try:
                self._call(reg, sink, "close")
            except Exception as e:  # noqa: BLE001 (raised below, after the others)
                failure = failure or e
        self.sinks = []
        if failure is not None:
            raise failure


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
