"""Weighted, staged data mixtures (`data.sources`, `data.stages`, `data.max_epochs`).

A mixture is named sources, each a corpus as `data.corpus` takes it (the embedded
"shakespeare" / "passkey", a file, directory, glob or prepared directory), with a weight:

    data.sources = "plays:0.8:shakespeare;keys:0.2:passkey"        name:weight:path; ...
    data.stages  = "0.9:plays=0.8,keys=0.2;1.0:plays=0.5,keys=0.5" until:name=weight,...
    data.max_epochs = "keys=4"                                      name=K,...

Sampling. Global batch b (the batch step b + 1 trains on) draws, for each of its B rows,
a uniform number from a generator seeded by (data seed, b) and picks the source whose
cumulative weight it falls under (the weights of the stage in force at step b + 1, the
capped sources that are used up left out and the rest renormalised). Each source is its
own endless stream of packed rows, shuffled by its own seed and reshuffled every epoch
(grain, as the single-corpus pipeline shuffles); a source picked n times so far gives
its stream's row n. So each source's frequency is its weight within binomial error, and
a mixture of one source is exactly the single-corpus pipeline (same seed, same rows).

State and resumption. The iterator's state is the number of global rows drawn and how
many each source has given; a checkpoint holds it, so a resumed run continues where it
stopped: no row is replayed or skipped. The stages are read when each batch is drawn:
a stage edited before resuming changes only the batches after the resume (the run's
past is what it was), and `data.stages` / `data.max_epochs` may differ on resumption
(their role "after_resume"). A stage's `until` is a step (an integer) or a fraction of
`steps` (a number <= 1 with a decimal point); a step after the last stage's end keeps
the last stage's weights. Without stages the sources' own weights hold throughout.

Epochs. A source's epoch is how many times its rows have all been drawn (rows drawn /
rows it has); the run prints a line when a source starts repeating and when a capped
source (`data.max_epochs`) is used up and leaves the mixture. When every source with
weight is used up, drawing stops with a DataError naming them.

Per process. Every process computes the same choices for the whole global batch (cheap:
no rows are read) and reads only its own rows, so the batches do not depend on how many
processes run the job (as for a single corpus).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import grain
import numpy as np

from lm.data.errors import DataError
from lm.errors import ConfigError


HISTORY = 512  # batches of per-source counts kept for logging (prefetch runs ahead)


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    path: str


def parse_sources(text: str) -> list[Source]:
    """`name:weight:path;...` (the path may itself hold colons: gs://...)."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        bits = part.split(":", 2)
        if len(bits) != 3 or not bits[0].strip() or not bits[2].strip():
            raise ConfigError(f"data.sources: {part!r} is not name:weight:path")
        name, weight, path = (b.strip() for b in bits)
        w = _weight(weight, f"data.sources: {name}'s weight")
        if any(s.name == name for s in out):
            raise ConfigError(f"data.sources: source {name!r} is named twice")
        out.append(Source(name, w, path))
    if not out:
        raise ConfigError(f"data.sources: no sources in {text!r}")
    if sum(s.weight for s in out) <= 0:
        raise ConfigError("data.sources: every weight is 0")
    return out


def _weights(text: str, names: list[str], key: str) -> dict[str, float]:
    out = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq:
            raise ConfigError(f"{key}: {item!r} is not name=value")
        if name not in names:
            raise ConfigError(f"{key}: unknown source {name!r} (sources: {', '.join(names)})")
        out[name] = _weight(value, f"{key}: {name}")
    return out


def _weight(text: str, what: str) -> float:
    """A finite number >= 0 (`what` names it in the error)."""
    try:
        w = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text.strip()!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{what} must be >= 0, got {text.strip()}")
    return w


def parse_stages(text: str, names: list[str], steps: int) -> list[tuple[int, dict[str, float]]]:
    """[(last step of the stage, {name: weight})], in order; sources a stage leaves out
    weigh 0 in it."""
    stages = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        until, colon, weights = part.partition(":")
        if not colon:
            raise ConfigError(f"data.stages: {part!r} is not until:name=weight,...")
        until = until.strip()
        try:
            end = (round(float(until) * steps) if "." in until else int(until))
        except ValueError:
            raise ConfigError(f"data.stages: until {until!r} is not a step or a fraction") from None
        if "." in until and not 0 < float(until) <= 1:
            raise ConfigError(f"data.stages: fraction {until} is not in (0, 1]")
        w = _weights(weights, names, "data.stages")
        if sum(w.values()) <= 0:
            raise ConfigError(f"data.stages: the stage until {until} weighs every source 0")
        if stages and end <= stages[-1][0]:
            raise ConfigError(f"data.stages: stage ends must increase ({until} after "
                              f"step {stages[-1][0]})")
        stages.append((end, {n: w.get(n, 0.0) for n in names}))
    return stages


def parse_epochs(text: str, names: list[str]) -> dict[str, float]:
    caps = _weights(text, names, "data.max_epochs")
    for name, k in caps.items():
        if k <= 0:
            raise ConfigError(f"data.max_epochs: {name} must be > 0, got {k}")
    return caps


def check(cfg, steps: int) -> None:
    """The mixture knobs of a DataConfig, before anything is read (one line each)."""
    if not cfg.sources:
        for key in ("stages", "max_epochs"):
            if getattr(cfg, key):
                raise ConfigError(f"data.{key} needs data.sources")
        return
    names = [s.name for s in parse_sources(cfg.sources)]
    parse_stages(cfg.stages, names, steps)
    parse_epochs(cfg.max_epochs, names)
    if cfg.format != "text":
        raise ConfigError("data.sources: mixtures are of text corpora (data.format=text)")


def source_config(cfg, source: Source):
    """The DataConfig of one source (its corpus; no mixture)."""
    return dataclasses.replace(cfg, corpus=source.path, sources="", stages="", max_epochs="")


class Schedule:
    """Mixture weights by step."""

    def __init__(self, sources: list[Source], stages, caps: dict[str, float]):
        self.names = [s.name for s in sources]
        self.base = np.array([s.weight for s in sources], np.float64)
        self.stages = stages
        self.caps = np.array([caps.get(n, np.inf) for n in self.names], np.float64)

    def weights(self, step: int) -> np.ndarray:
        if not self.stages:
            return self.base
        for end, w in self.stages:
            if step <= end:
                return np.array([w[n] for n in self.names], np.float64)
        return np.array([self.stages[-1][1][n] for n in self.names], np.float64)


def _pick(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sources for uniform draws `u`: where each falls among the cumulative weights (a
    source of weight 0 has an empty interval and is never picked)."""
    cum = np.cumsum(weights / weights.sum())
    cum[-1] = 1.0
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


class MixtureIterator(grain.DatasetIterator):
    """This process's rows of each global batch of a mixture (module doc); a grain
    DatasetIterator with a small JSON state, checkpointed like the single-corpus one."""

    def __init__(self, rows: list, schedule: Schedule, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, announce=print):
        super().__init__()
        self.rows, self.schedule = rows, schedule
        self.sizes = np.array([len(r) for r in rows], np.int64)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.local = batch_size // process_count
        self.first = process_index * self.local
        self.streams = [grain.MapDataset.source(r).shuffle(seed=self._source_seed(i)).repeat(
            None, reseed_each_epoch=True) for i, r in enumerate(rows)]
        self.announce = announce
        self.batches = 0  # global batches drawn
        self.counts = np.zeros(len(rows), np.int64)  # rows each source has given
        self.history = {0: self.counts.copy()}  # batches drawn -> counts then (recent)

    def _source_seed(self, i: int) -> int:
        return self.seed + 1_000_003 * i  # source 0: the single-corpus pipeline's seed

    def choices(self, batch: int, counts: np.ndarray) -> np.ndarray:
        """The source of each of global batch `batch`'s rows, given the counts so far. A
        capped source stops at its cap exactly, mid-batch too: the batch's later rows
        are drawn among the others."""
        weights = self.schedule.weights(batch + 1)
        limit = self.schedule.caps * self.sizes
        u = np.random.default_rng([self.seed, batch]).random(self.batch_size)
        if not np.isfinite(limit).any():
            return _pick(weights, u)
        counts, picks = counts.copy(), np.empty(self.batch_size, np.int64)
        for i in range(self.batch_size):
            live = np.where(counts >= limit, 0.0, weights)
            if live.sum() <= 0:
                names = [n for n, w in zip(self.schedule.names, weights) if w > 0]
                raise DataError(f"data.max_epochs: every source with weight at step "
                                f"{batch + 1} ({', '.join(names)}) is used up")
            picks[i] = _pick(live, u[i:i + 1])[0]
            counts[picks[i]] += 1
        return picks

    def __next__(self) -> dict:
        picks = self.choices(self.batches, self.counts)
        before = self.counts.copy()
        out = []
        for i, src in enumerate(picks):
            n = self.counts[src]
            self.counts[src] += 1
            if self.first <= i < self.first + self.local:
                out.append(self.streams[src][int(n)])
        self.batches += 1
        self.history[self.batches] = self.counts.copy()
        self.history.pop(self.batches - HISTORY, None)
        self._report(before)
        return {k: np.stack([r[k] for r in out]) for k in out[0]}

    def _report(self, before: np.ndarray) -> None:
        for i, name in enumerate(self.schedule.names):
            old, new = before[i] // self.sizes[i], self.counts[i] // self.sizes[i]
            if new > old:
                cap = self.schedule.caps[i]
                if new >= cap:
                    self.announce(f"data: source {name} is used up after {int(cap)} epoch(s) "
                                  f"(batch {self.batches}); it leaves the mixture")
                else:
                    self.announce(f"data: source {name} repeats: epoch {new + 1} starts at "
                                  f"batch {self.batches}")

    def drawn(self, batches: int) -> dict | None:
        """{"tokens/<source>": rows x seq_len drawn, "epochs/<source>": rows drawn / rows}
        after `batches` global batches (the metrics of step `batches`); None if that is
        no longer (or not yet) known."""
        counts = self.history.get(batches)
        if counts is None:
            return None
        seq = self.rows[0].seq_len
        out = {f"tokens/{n}": float(c * seq) for n, c in zip(self.schedule.names, counts)}
        out.update({f"epochs/{n}": float(c / s) for n, c, s in
                    zip(self.schedule.names, counts, self.sizes)})
        return out

    def get_state(self) -> dict:
        return {"batches": int(self.batches), "counts": [int(c) for c in self.counts]}

    def set_state(self, state: dict) -> None:
        counts = np.asarray(state["counts"], np.int64)
        if counts.shape != self.counts.shape:
            raise ConfigError(f"the checkpoint's data state has {len(counts)} sources, the "
                              f"config {len(self.counts)}: data.sources changed")
        self.batches, self.counts = int(state["batches"]), counts
        self.history = {self.batches: counts.copy()}
