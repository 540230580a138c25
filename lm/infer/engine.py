"""The batched inference engine: requests in a queue, a fixed number of slots (sequences
decoded together), a pool of K/V pages, continuous batching, streamed tokens.

Life of a request: `submit` splits it into its n samples (sequences) and queues them.
Each `step` (1) admits queued sequences, in order, while a slot is free, the pool has
the pages of its prompt (else it waits: back-pressure) and the prefill's token budget
lasts; a prompt whose leading whole pages are already in the pool (the same tokens after
the same pages: a shared few-shot prefix, the n samples of one prompt) takes those pages
instead of new ones. The admitted prompts are prefilled together, packed several to a
row with segment ids (Prepacking), reading the shared pages rather than feeding them.
(2) gives every running sequence the page its next token needs, as it grows; (3) runs
one decode step over all slots, in which the rows that share prefix pages read them
once for the group (Hydragen, lm/model/paged.py); (4) hands back the new tokens as
events and frees the slots and pages of sequences that finished (stop id, stop string,
max_new_tokens, or the model's max_seq_len). A page shared by several sequences is freed
when the last one lets go.

When the pool runs dry mid-generation, a sequence that needs a page waits for one; if
every running sequence waits, the one admitted last is preempted: its pages are given
back and it is queued again at the front, to be prefilled and then fed the tokens it
had already produced (teacher-forced through the same decode step).

Batch independence: token i of sample j is drawn with a key of (seed, j, i), and a
decode row's arithmetic never mixes with the other rows' (fixed shapes, no cross-row
op). What else runs decides two things, each exact up to float rounding: which prompts
share a prefill row (each masked to its own segment), and whether a row reads its
prefix pages through a Hydragen group or its own table. So a request's logits may differ
in their last bits with the batch, and its tokens do not change (tested);
`pack_prefill=False, share_prefixes=False, hydragen=False` leaves only the prefill's
row count and length to vary.
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
from lm.infer.steps import has_slot_state, programs
from lm.model.paged import TRASH_PAGE, PageStep


@dataclass(frozen=True)
class Request:
    """What to generate. `stop_ids` end a sample (the id is not part of it, unless
    `keep_stop`);
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
    keep_stop: bool = False  # a stop id stays as the sample's last token (as transformers'
    # generate returns it: what the harness's HF backend decodes)


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
    start: int = 0  # prompt tokens found in shared pages (not fed in the prefill)
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
                 decode: Callable[[list[int]], str] | None = None,
                 prefill_tokens: int = 0, pack_prefill: bool = True,
                 share_prefixes: bool = True, hydragen: bool = True, max_groups: int = 4):
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
        # Recurrent layers keep one state per slot, which a row of several prompts, or a
        # prefix read from pages, cannot give: their prompts prefill one to a row, whole.
        recurrent = has_slot_state(self.cache)
        self.pack_prefill = pack_prefill and not recurrent
        self.share_prefixes = share_prefixes and not recurrent
        self.hydragen, self.max_groups = hydragen, max_groups
        # Prompt tokens one prefill takes (at least one whole prompt).
        self.prefill_tokens = prefill_tokens or max(self.max_seq_len, 512)
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
        in_use = self.pool.capacity - self.pool.free
        self.stats["peak_pages"] = max(self.stats["peak_pages"], in_use)
        if active:
            self._decode_step(active, events)
        return events

    def _admit(self, events: list[Event]) -> None:
        """Admit queued sequences in order while a slot is free, the pool has their
        pages and the prefill's token budget lasts; prefill them together."""
        batch, fed, ps = [], 0, self.page_size
        while self.queue and None in self.running:
            seq = self.queue[0]
            prompt = seq.tokens[:seq.n_prompt]
            # A shared prefix: whole pages, and at least the last prompt token fed (its
            # logits give the first sample).
            hits = (self.pool.lookup(prompt, (seq.n_prompt - 1) // ps)
                    if self.share_prefixes else [])
            need = self.pool.pages_for(seq.n_prompt) - len(hits)
            feed = seq.n_prompt - len(hits) * ps
            if need > self.pool.free or (batch and fed + feed > self.prefill_tokens):
                break  # back-pressure: it waits for pages (or the next prefill)
            self.queue.popleft()
            self.pool.share(hits)
            seq.pages = hits + self.pool.take(need)
            if self.share_prefixes:
                self.pool.index(prompt, seq.pages, len(hits))
            seq.start = len(hits) * ps
            seq.slot = self.running.index(None)
            self.running[seq.slot] = seq
            self._admitted += 1
            seq.order = self._admitted
            batch.append(seq)
            fed += feed
        if batch:
            self._prefill_batch(batch, events)

    def _sampling(self, seqs: list[_Seq | None], index: list[int]):
        """Per-row (seed, sample, token index, temperature, top_k, top_p), as numpy
        (handed to the step as they are: no dispatch per array)."""
        def col(fn, dtype, idle=0):
            return np.asarray([fn(s) if s is not None else idle for s in seqs], dtype)
        return (col(lambda s: s.req.seed, np.int32), col(lambda s: s.sample, np.int32),
                np.asarray(index, np.int32), col(lambda s: s.req.temperature, np.float32),
                col(lambda s: s.req.top_k, np.int32),
                col(lambda s: s.req.top_p, np.float32, 1.0))

    def _rows(self, batch: list[_Seq]) -> tuple[int, list[list[_Seq]]]:
        """Row length and rows of the prefill: first-fit decreasing packing of the fed
        tokens (Prepacking, arXiv:2404.09529), or one sequence a row."""
        lengths = {id(s): s.n_prompt - s.start for s in batch}
        t = _bucket(max(lengths.values()), 16, self.max_seq_len)
        if not self.pack_prefill:
            return t, [[s] for s in batch]
        rows: list[list[_Seq]] = []
        room: list[int] = []
        for s in sorted(batch, key=lambda s: -lengths[id(s)]):
            for i, r in enumerate(room):
                if lengths[id(s)] <= r:
                    rows[i].append(s)
                    room[i] -= lengths[id(s)]
                    break
            else:
                rows.append([s])
                room.append(t - lengths[id(s)])
        return t, rows

    def _prefill_batch(self, batch: list[_Seq], events: list[Event]) -> None:
        ps = self.page_size
        t, rows = self._rows(batch)
        n_rows = _bucket(len(rows), 1, 1 << 30)
        tokens = np.zeros((n_rows, t), np.int32)
        positions = np.zeros((n_rows, t), np.int32)
        segments = np.zeros((n_rows, t), np.int32)
        write = np.full((n_rows, t), TRASH_PAGE, np.int32)
        group = np.full((n_rows, t), -1, np.int32)
        slots = np.full((n_rows,), self.slots, np.int32)  # out of range: dropped
        prefixes: dict[tuple, int] = {}  # shared prefix pages -> group
        order, last = [], []
        for r, row in enumerate(rows):
            used = sum(s.n_prompt - s.start for s in row)
            col = 0 if self.pack_prefill else t - used  # (one a row: left-padded)
            slots[r] = row[0].slot if len(row) == 1 else self.slots
            for segment, s in enumerate(row, 1):
                n = s.n_prompt - s.start
                span = slice(col, col + n)
                pos = np.arange(s.start, s.n_prompt)
                tokens[r, span] = s.tokens[s.start:s.n_prompt]
                positions[r, span] = pos
                segments[r, span] = segment
                write[r, span] = np.asarray(s.pages)[pos // ps]
                if s.start:
                    key = tuple(s.pages[:s.start // ps])
                    group[r, span] = prefixes.setdefault(key, len(prefixes))
                order.append(s)
                last.append(r * t + col + n - 1)
                col += n
        step = PageStep(write, np.zeros((n_rows, 0), np.int32), np.zeros((n_rows,), np.int32),
                        group, *self._group_tables(list(prefixes)))
        n_seqs = _bucket(len(order), 1, 1 << 30)
        last += [0] * (n_seqs - len(order))
        padded = order + [None] * (n_seqs - len(order))
        out, self.cache = self._prefill(
            self.params, self.cache, tokens, positions, segments, step, slots,
            np.asarray(last, np.int32), self._sampling(padded, [s.n_prompt for s in order]
                                                       + [0] * (n_seqs - len(order))))
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(rows)
        self.stats["prefill_tokens"] += sum(s.n_prompt - s.start for s in order)
        self.stats["prefix_hit_tokens"] += sum(s.start for s in order)
        out = jax.device_get(out)
        for s, token in zip(order, out):
            s.cached = s.n_prompt
            if len(s.tokens) == s.n_prompt:  # (a preempted sequence replays its own tokens)
                self._take(s, int(token), events)

    def _group_tables(self, prefixes: list[tuple]):
        """group_table [G, Mp] and group_len [G] of the shared prefixes (G = 0: none)."""
        if not prefixes:
            return np.zeros((0, 0), np.int32), np.zeros((0,), np.int32)
        g = _bucket(len(prefixes), 1, 1 << 30)
        width = _bucket(max(len(p) for p in prefixes), 1, self.max_pages)
        table = np.full((g, width), TRASH_PAGE, np.int32)
        length = np.zeros((g,), np.int32)
        for i, p in enumerate(prefixes):
            table[i, :len(p)] = p
            length[i] = len(p) * self.page_size
        return table, length

    def _decode_groups(self, rows: list[_Seq | None]) -> dict[int, tuple]:
        """Hydragen groups of the decode step: rows whose first pages are the same
        physical pages (a shared prompt prefix), up to max_groups of the largest, as
        {row: prefix pages}."""
        by_first: dict[int, list[int]] = collections.defaultdict(list)
        for i, s in enumerate(rows):
            if s is not None and s.pages and self.pool.refs[s.pages[0]] > 1:
                by_first[s.pages[0]].append(i)
        groups = []
        for members in by_first.values():
            if len(members) < 2:
                continue
            seqs = [rows[i] for i in members]
            k, most = 0, min(s.cached for s in seqs) // self.page_size
            while k < most and all(s.pages[k] == seqs[0].pages[k] for s in seqs):
                k += 1
            if k:
                groups.append((len(members) * k, members, tuple(seqs[0].pages[:k])))
        groups.sort(key=lambda g: -g[0])
        return {i: pages for _, members, pages in groups[:self.max_groups] for i in members}

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
        ps = self.page_size
        rows = [s if s in active else None for s in self.running]
        tokens = [s.tokens[s.cached] if s else 0 for s in rows]
        positions = [s.cached if s else 0 for s in rows]
        in_group = self._decode_groups(rows) if self.hydragen else {}
        prefixes = list(dict.fromkeys(in_group.values()))
        write = np.full((self.slots, 1), TRASH_PAGE, np.int32)
        group = np.full((self.slots, 1), -1, np.int32)
        read_from = np.zeros((self.slots,), np.int32)
        own = []  # each row's pages after its group's prefix, up to its fed position
        for i, s in enumerate(rows):
            if s is None:
                own.append([])
                continue
            write[i, 0] = s.pages[s.cached // ps]
            skip = len(in_group.get(i, ()))
            if skip:
                group[i, 0] = prefixes.index(in_group[i])
            read_from[i] = skip * ps
            # (through the fed position: the TPU kernel reads the new key from its page)
            own.append(s.pages[skip:s.cached // ps + 1])
        width = _bucket(max(len(o) for o in own), 1, self.max_pages)
        read = np.full((self.slots, width), TRASH_PAGE, np.int32)
        for i, o in enumerate(own):
            read[i, :len(o)] = o
        step = PageStep(write, read, read_from, group, *self._group_tables(prefixes))
        out, self.cache = self._decode(
            self.params, self.cache, np.asarray(tokens, np.int32),
            np.asarray(positions, np.int32), np.asarray([s is not None for s in rows]),
            step, self._sampling(rows, [p + 1 for p in positions]))
        self.stats["decode_steps"] += 1
        if in_group:
            self.stats["hydragen_steps"] += 1
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
            if r.keep_stop:
                seq.tokens.append(token)
                self.stats["tokens"] += 1
                events.append(Event(seq.rid, seq.sample, token))
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
