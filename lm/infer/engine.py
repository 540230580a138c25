"""The batched inference engine: requests in a queue, a fixed number of slots (sequences
decoded together), a pool of K/V pages, continuous batching, streamed tokens.

Life of a request: `submit` splits it into its n samples (sequences) and queues them.
Each `step` (1) admits queued sequences, in order, while a slot is free and the pool has
the pages of its prompt (else it waits: back-pressure), prefilling each alone into its
pages (or its slot's recurrent state); (2) gives every running sequence the page its next
token needs, as it grows; (3) runs one decode step over all slots; (4) hands back the
new tokens as events and frees the slots and pages of sequences that finished (stop id,
stop string, max_new_tokens, or the model's max_seq_len).

When the pool runs dry mid-generation, a sequence that needs a page waits for one; if
every running sequence waits, the one admitted last is preempted: its pages are freed
and it is queued again at the front, to be prefilled and then fed the tokens it had
already produced (teacher-forced through the same decode step, so its cache ends up
bit for bit what it was: the output is unchanged).

Determinism: a sequence's prefill runs alone at batch 1; in decode every row's
arithmetic is independent of the other rows (fixed shapes; no cross-row op), and its
token is drawn with a key of (seed, sample index, token index). So a request's output
depends only on its prompt, settings, seed and the params, never on the batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx

from lm.errors import ConfigError
from lm.infer.pages import PagePool
from lm.infer.steps import programs
from lm.model.paged import TRASH_PAGE


@dataclass(frozen=True)
class Request:
    """What to generate. `stop_ids` end a sample (the id is not part of it);
    `stop_strings` end it at the first occurrence in its text (needs the engine's
    `decode`); `n` samples, each with its own key."""
    prompt: tuple[int, ...]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    n: int = 1
    id: Any = None


@dataclass
class Completion:
    tokens: list[int]  # generated ids (a stop id excluded)
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded (cut at a stop string), when the engine has `decode`


@dataclass
class Result:
    id: Any
    prompt_tokens: int
    completions: list[Completion]


@dataclass(frozen=True)
class Event:
    """A token of sample `sample` of request `id` (token None: the request is done and
    `result` holds it)."""
    id: Any
    sample: int = 0
    token: int | None = None
    result: Result | None = None


@dataclass(eq=False)
class _Seq:
    req: Request
    rid: Any
    sample: int
    tokens: list[int]  # prompt + generated
    n_prompt: int
    cached: int = 0  # tokens whose K/V (or state) the cache holds
    pages: list[int] = field(default_factory=list)
    slot: int = -1
    order: int = 0  # admission counter (preemption picks the latest)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]


def _bucket(n: int, low: int, high: int) -> int:
    """n rounded up to a power of two, at least `low`, at most `high`."""
    b = low
    while b < n:
        b *= 2
    return max(n, min(b, high))


class Engine:
    """`Engine(graphdef, params, slots=8, pages=256, page_size=16)`; `submit(Request)`
    -> id; `run()` yields Events until the queue drains (submit more while iterating:
    they join the running batch); `generate(requests)` -> Results in order."""

    def __init__(self, graphdef, params, *, slots: int = 8, pages: int = 256,
                 page_size: int = 16, max_seq_len: int | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        model = nnx.merge(graphdef, params)
        cfg = model.cfg if hasattr(model, "cfg") else model.base.cfg
        if slots < 1 or page_size < 1:
            raise ConfigError(f"engine: slots ({slots}) and page_size ({page_size}) must be >= 1")
        if pages < 2:
            raise ConfigError(f"engine: pages must be >= 2 (page 0 is the trash page), got {pages}")
        self.graphdef, self.params, self.decode = graphdef, params, decode
        self.slots, self.page_size = slots, page_size
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        self.max_pages = -(-self.max_seq_len // page_size)  # per sequence
        self.pool = PagePool(pages, page_size)
        self.cache = model.init_slot_cache(slots, pages, page_size)  # refuses a mixer
        self._layers = cfg.n_layers if cfg.scan_layers else None
        self._prefill, self._decode = programs(graphdef, self._layers)
        self.queue: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq | None] = [None] * slots
        self._pending: dict[Any, list] = {}  # id -> [request, completions by sample]
        self._next_id, self._admitted = 0, 0
        self.stats = collections.Counter()  # prefills, decode_steps, preemptions, tokens

    # ---------------------------------------------------------------- requests

    def submit(self, request: Request) -> Any:
        """Queue a request; returns its id (request.id, or a counter)."""
        r = request
        if not r.prompt:
            raise ConfigError("engine: a prompt must hold at least one token")
        if len(r.prompt) >= self.max_seq_len:
            raise ConfigError(f"engine: a prompt of {len(r.prompt)} tokens leaves no room "
                              f"to generate within max_seq_len={self.max_seq_len}")
        if r.max_new_tokens < 1 or r.n < 1 or r.temperature < 0 or r.top_k < 0 or not (
                0 < r.top_p <= 1):
            raise ConfigError(f"engine: bad sampling settings in {r}")
        if r.stop_strings and self.decode is None:
            raise ConfigError("engine: stop strings need the engine's decode (a tokenizer)")
        longest = min(len(r.prompt) + r.max_new_tokens, self.max_seq_len)
        if self.pool.pages_for(longest) > self.pool.capacity:
            raise ConfigError(f"engine: a sequence of {longest} tokens needs "
                              f"{self.pool.pages_for(longest)} pages; the pool holds "
                              f"{self.pool.capacity}")
        rid = r.id
        if rid is None:
            rid, self._next_id = self._next_id, self._next_id + 1
        if rid in self._pending:
            raise ConfigError(f"engine: request id {rid!r} is already in flight")
        self._pending[rid] = [r, [None] * r.n]
        prompt = [int(t) for t in r.prompt]
        for i in range(r.n):
            self.queue.append(_Seq(r, rid, i, list(prompt), len(prompt)))
        return rid

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        ids = [self.submit(r) for r in requests]
        done = {e.id: e.result for e in self.run() if e.result is not None}
        return [done[i] for i in ids]

    def run(self) -> Iterator[Event]:
        """Events until nothing is queued or running."""
        while self.queue or any(self.running):
            yield from self.step()

    @property
    def idle(self) -> bool:
        return not self.queue and not any(self.running)

    # ---------------------------------------------------------------- scheduling

    def step(self) -> list[Event]:
        events: list[Event] = []
        self._admit(events)
        active = self._grow()
        if active:
            self._decode_step(active, events)
        return events

    def _admit(self, events: list[Event]) -> None:
        while self.queue and None in self.running:
            seq = self.queue[0]
            need = self.pool.pages_for(seq.n_prompt)
            if need > self.pool.free:
                return  # back-pressure: it waits for pages
            self.queue.popleft()
            seq.pages = self.pool.take(need)
            seq.slot = self.running.index(None)
            self.running[seq.slot] = seq
            self._admitted += 1
            seq.order = self._admitted
            self._prefill_one(seq, events)

    def _sampling(self, seqs: list[_Seq | None], index: list[int]):
        """Per-row (seed, sample, token index, temperature, top_k, top_p), as numpy
        (handed to the step as they are: no dispatch per array)."""
        def col(fn, dtype, idle=0):
            return np.asarray([fn(s) if s is not None else idle for s in seqs], dtype)
        return (col(lambda s: s.req.seed, np.int32), col(lambda s: s.sample, np.int32),
                np.asarray(index, np.int32), col(lambda s: s.req.temperature, np.float32),
                col(lambda s: s.req.top_k, np.int32),
                col(lambda s: s.req.top_p, np.float32, 1.0))

    def _table(self, seqs: list[_Seq | None], width: int):
        table = np.full((len(seqs), width), TRASH_PAGE, np.int32)
        for i, s in enumerate(seqs):
            if s is not None:
                table[i, :len(s.pages)] = s.pages
        return table

    def _prefill_one(self, seq: _Seq, events: list[Event]) -> None:
        n = seq.n_prompt
        t = _bucket(n, 16, self.max_seq_len)
        pad = t - n  # left padding: segment 0, written to the trash page
        tokens = np.asarray([[0] * pad + seq.tokens[:n]], np.int32)
        positions = np.asarray([[0] * pad + list(range(n))], np.int32)
        segments = np.asarray([[0] * pad + [1] * n], np.int32)
        width = _bucket(len(seq.pages), 1, self.max_pages)
        token, self.cache = self._prefill(
            self.params, self.cache, tokens, positions, segments,
            self._table([seq], width), np.int32(seq.slot), self._sampling([seq], [n]))
        self.stats["prefills"] += 1
        seq.cached = n
        if len(seq.tokens) == n:  # (a preempted sequence replays its own tokens instead)
            self._take(seq, int(jax.device_get(token)[0]), events)

    def _grow(self) -> list[_Seq]:
        """The running sequences that get a decode step, each with the page for the
        position it writes; preempts the latest admitted while none can proceed."""
        while True:
            live = [s for s in self.running if s is not None]
            if not live:
                return []
            ready = []
            for s in live:
                if len(s.pages) * self.page_size > s.cached:
                    ready.append(s)
                elif self.pool.free:
                    s.pages += self.pool.take(1)
                    ready.append(s)
            if ready:
                return ready
            self._preempt(max(live, key=lambda s: s.order))

    def _preempt(self, seq: _Seq) -> None:
        self.stats["preemptions"] += 1
        self.pool.give_back(seq.pages)
        seq.pages, seq.cached = [], 0
        self.running[seq.slot] = None
        seq.slot = -1
        self.queue.appendleft(seq)

    def _decode_step(self, active: list[_Seq], events: list[Event]) -> None:
        rows = [s if s in active else None for s in self.running]
        tokens = [s.tokens[s.cached] if s else 0 for s in rows]
        positions = [s.cached if s else 0 for s in rows]
        width = _bucket(max(len(s.pages) for s in active), 1, self.max_pages)
        out, self.cache = self._decode(
            self.params, self.cache, np.asarray(tokens, np.int32),
            np.asarray(positions, np.int32), np.asarray([s is not None for s in rows]),
            self._table(rows, width), self._sampling(rows, [p + 1 for p in positions]))
        self.stats["decode_steps"] += 1
        out = jax.device_get(out)
        for s, token in zip(rows, out):
            if s is None:
                continue
            s.cached += 1
            if s.cached == len(s.tokens):  # a new token (else a replayed one)
                self._take(s, int(token), events)

    # ---------------------------------------------------------------- finishing

    def _take(self, seq: _Seq, token: int, events: list[Event]) -> None:
        """A new token of `seq`: stream it, and finish the sequence if it ends here."""
        r = seq.req
        if token in r.stop_ids:
            return self._finish(seq, "stop", events)
        seq.tokens.append(token)
        self.stats["tokens"] += 1
        events.append(Event(seq.rid, seq.sample, token))
        if r.stop_strings and self._stop_string(seq) is not None:
            return self._finish(seq, "stop", events)
        if len(seq.generated) >= r.max_new_tokens or len(seq.tokens) > self.max_seq_len:
            # (the token at position max_seq_len is never fed: no room for it)
            self._finish(seq, "length", events)

    def _stop_string(self, seq: _Seq) -> int | None:
        """Where the first stop string starts in the sample's text, or None. Only the
        tail that the last token can have completed is decoded per token."""
        longest = max(len(s) for s in seq.req.stop_strings)
        tail = self.decode(seq.generated[-(4 * longest + 8):])  # (a char: <= 4 byte tokens)
        if not any(s in tail for s in seq.req.stop_strings):
            return None
        text = self.decode(seq.generated)
        hits = [text.find(s) for s in seq.req.stop_strings if s in text]
        return min(hits) if hits else None

    def _finish(self, seq: _Seq, reason: str, events: list[Event]) -> None:
        self.pool.give_back(seq.pages)
        seq.pages = []
        self.running[seq.slot] = None
        text = None
        if self.decode is not None:
            text = self.decode(seq.generated)
            cut = self._stop_string(seq) if seq.req.stop_strings else None
            if cut is not None:
                text = text[:cut]
        entry = self._pending[seq.rid]
        entry[1][seq.sample] = Completion(seq.generated, reason, text)
        if all(c is not None for c in entry[1]):
            del self._pending[seq.rid]
            events.append(Event(seq.rid, result=Result(seq.rid, seq.n_prompt, entry[1])))

    def cancel(self, rid: Any) -> bool:
        """Drop request `rid` (between steps): its queued sequences go, its running ones
        give back their slots and pages; no event follows for it. False where it is not in
        flight (done, or never submitted)."""
        if self._pending.pop(rid, None) is None:
            return False
        kept = [s for s in self.queue if s.rid != rid]
        self.queue.clear()
        self.queue.extend(kept)
        for i, s in enumerate(self.running):
            if s is not None and s.rid == rid:
                self.pool.give_back(s.pages)
                s.pages, self.running[i] = [], None
        self.stats["cancelled"] += 1
        return True
