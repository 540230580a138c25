"""The grain input pipeline: packed fixed-length rows of documents.

Row format (numpy; shape [T] per row, [B, T] per batch, T = data.seq_len):

    inputs       int32    token ids fed to the model
    targets      int32    the next token for each input position
    segment_ids  int32    1, 2, ... per document piece within the row; 0 = padding
    positions    int32    position within the piece, restarting at 0 at each piece
    loss_mask    float32  1 where targets is a real next token of the same document (the
                          document's own weight there, for instruction data: 0 on prompts)

Packing. Each document is framed as its tokenizer frames a text, then EOS ([BOS] + ids
+ [EOS] for the byte tokenizer; lm/data/tokenized.py) (length L) and cut into
pieces of at most T+1 tokens starting every T tokens (0, T, 2T, ...), so
consecutive pieces overlap by one token and each of tokens 1..L-1 is a target
exactly once. A piece of n tokens gives inputs piece[:-1] and targets piece[1:]
(n-1 slots). Full pieces (n = T+1) fill a row alone. Short pieces (tails and
short documents) are packed best-fit-decreasing into shared rows, each piece its
own segment; leftover space is padding (PAD ids, segment 0, loss_mask 0). The
model must restrict attention to equal, non-zero segment ids.

The row index (per-row tables of (shard, start, length) pieces) is built once with
numpy over the flat token arrays of `lm.data.tokenized.TokenDocs`; `PackedRows`
serves rows lazily by index and is wrapped in `grain.MapDataset.source`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import grain
import numpy as np

from lm.data.errors import DataError
from lm.data.tokenized import TokenDocs, token_docs

# The row format, defined once (the table above): key -> dtype. A batch is these keys,
# each [B, T]; the train step's abstract batch and every consumer take them from here.
ROW_DTYPES = {
    "inputs": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "loss_mask": np.dtype(np.float32),
}
ROW_KEYS = tuple(ROW_DTYPES)


@dataclass(frozen=True, eq=False)
class RowIndex:
    row_ptr: np.ndarray  # int64 [rows + 1]: row r holds pieces row_ptr[r]:row_ptr[r+1]
    shard: np.ndarray  # int32 [pieces]
    start: np.ndarray  # int64 [pieces] offset into tokens[shard]
    length: np.ndarray  # int32 [pieces] tokens in the piece (n); it fills n - 1 slots

    def __len__(self) -> int:
        return len(self.row_ptr) - 1


def build_row_index(docs: TokenDocs, seq_len: int) -> RowIndex:
    T = int(seq_len)
    shards, starts, lengths = [], [], []
    for s, offs in enumerate(docs.offsets):
        offs = np.asarray(offs, np.int64)
        L = np.diff(offs)
        L = np.where(L >= 2, L, 1)  # a 1-token doc has nothing to predict: 0 pieces
        n = (L - 2) // T + 1  # pieces per document = ceil((L - 1) / T)
        n[L < 2] = 0
        doc = np.repeat(np.arange(len(L)), n)
        first = np.repeat(np.cumsum(n) - n, n)
        k = np.arange(len(doc)) - first  # piece number within its document
        starts.append(offs[:-1][doc] + k * T)
        lengths.append(np.minimum(T + 1, L[doc] - k * T))
        shards.append(np.full(len(doc), s, np.int32))
    shard = np.concatenate(shards) if shards else np.zeros(0, np.int32)
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    length = (np.concatenate(lengths) if lengths else np.zeros(0, np.int64)).astype(np.int32)

    full = np.flatnonzero(length == T + 1)
    packed = _pack(np.flatnonzero(length < T + 1), length - 1, T)
    order = np.concatenate([full] + [np.asarray(r, np.int64) for r in packed]).astype(np.int64)
    sizes = np.concatenate([np.ones(len(full), np.int64),
                            np.asarray([len(r) for r in packed], np.int64)])
    row_ptr = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=row_ptr[1:])
    return RowIndex(row_ptr, shard[order], start[order], length[order])


def _pack(pieces: np.ndarray, slots: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of pieces (by slot count) into rows.

    Deterministic: pieces are taken longest first (ties by index) and each goes
    to the open row with the least remaining room that fits it (rows with equal
    room: most recently opened), else a new row. Open rows are kept in buckets
    by remaining room, so each step is O(log T) instead of O(rows).
    """
    need = slots[pieces]
    order = pieces[np.lexsort((pieces, -need))]
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = {}  # remaining room -> open rows
    rooms: list[int] = []  # sorted keys of buckets
    for p in order.tolist():
        m = int(slots[p])
        j = bisect.bisect_left(rooms, m)
        if j < len(rooms):
            room = rooms[j]
            r = buckets[room].pop()
            if not buckets[room]:
                del buckets[room]
                rooms.pop(j)
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(p)
        left = room - m
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                bisect.insort(rooms, left)
            buckets[left].append(r)
    return rows


class PackedRows:
    """Random-access source of packed rows (grain's RandomAccessDataSource protocol)."""

    def __init__(self, docs: TokenDocs, seq_len: int, pad_id: int):
        self.tokens = docs.tokens
        self.weights = docs.weights
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.index = build_row_index(docs, seq_len)
        self.num_targets = int((self.index.length.astype(np.int64) - 1).sum())

    def __len__(self) -> int:
        return len(self.index)

    def empty_row(self) -> dict:
        pad = {"inputs": self.pad_id, "targets": self.pad_id}
        return {k: np.full(self.seq_len, pad.get(k, 0), dtype) for k, dtype in ROW_DTYPES.items()}

    def __getitem__(self, r) -> dict:
        r = int(r)
        if not 0 <= r < len(self):
            raise IndexError(r)
        ix = self.index
        row = self.empty_row()
        c = 0
        for seg, p in enumerate(range(ix.row_ptr[r], ix.row_ptr[r + 1]), 1):
            s, n = int(ix.start[p]), int(ix.length[p])
            toks = np.asarray(self.tokens[ix.shard[p]][s:s + n], np.int32)
            m = n - 1
            row["inputs"][c:c + m] = toks[:-1]
            row["targets"][c:c + m] = toks[1:]
            row["segment_ids"][c:c + m] = seg
            row["positions"][c:c + m] = np.arange(m, dtype=np.int32)
            row["loss_mask"][c:c + m] = (1.0 if self.weights is None else
                                         self.weights[ix.shard[p]][s + 1:s + n])
            c += m
        return row

    def __repr__(self) -> str:
        return f"PackedRows(rows={len(self)}, seq_len={self.seq_len})"


def _stack(rows) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def packed_rows(cfg, tokenizer, split: str) -> PackedRows:
    """The packed rows of one split (the data behind train_iterator / eval_batches)."""
    return PackedRows(token_docs(cfg, tokenizer, split), cfg.seq_len, tokenizer.pad_id)


def train_iterator(cfg, tokenizer, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   read_threads: int = 0, steps: int = 0) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's part of each global batch.

    `batch_size` is the GLOBAL batch. All rows are shuffled by `seed` (reshuffled each
    epoch, grain reseeds per repeat) into one global stream; global batch b is stream
    items [b*B, (b+1)*B), and process p reads only items p*B/P .. (p+1)*B/P - 1 of each
    (rows are read lazily, so a process touches only its share). The concatenation
    of the processes' batches is therefore the single-process batch: the data does not
    depend on how many hosts run the job. The returned grain iterator has
    get_state()/set_state() with a small JSON-serialisable state. read_threads > 0
    prefetches rows in threads (still deterministic). A mixture (data.sources) is a
    lm.data.mixture.MixtureIterator over its sources' rows (`steps`: what a stage's
    fraction of the run is of).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} does not divide by {process_count} processes")
    if cfg.sources:
        return _mixture_iterator(cfg, tokenizer, batch_size, seed, process_index,
                                 process_count, steps)
    rows = packed_rows(cfg, tokenizer, "train")
    if len(rows) == 0:
        raise DataError(f"data.corpus: the train split of {cfg.corpus} has no tokens")
    return host_batches(rows, batch_size, seed, process_index, process_count, read_threads,
                        _stack)


def host_batches(rows, global_batch: int, seed: int, process_index: int, process_count: int,
                 read_threads: int, batch_fn):
    """An iterator over this process's share of global batches of `rows` (items of a
    random-access source), shuffled by `seed`, repeated with a new order each epoch:
    global batch i is items [i * global_batch, (i + 1) * global_batch) of the stream, and
    process p reads its contiguous `global_batch / process_count` of them. Its grain
    iterator state is what a checkpoint saves."""
    stream = grain.MapDataset.source(rows).shuffle(seed=int(seed)).repeat(
        None, reseed_each_epoch=True)
    local = global_batch // process_count
    if process_count > 1:
        source = stream

        def global_item(j: int):
            return source[(j // local) * global_batch + process_index * local + j % local]

        stream = grain.MapDataset.range(0, len(stream) // process_count).map(global_item)
    read = grain.ReadOptions(num_threads=read_threads,
                             prefetch_buffer_size=4 * local if read_threads else 0)
    return iter(stream.to_iter_dataset(read).batch(local, drop_remainder=True,
                                                   batch_fn=batch_fn))


def _mixture_iterator(cfg, tokenizer, batch_size, seed, process_index, process_count, steps):
    from lm.data import mixture
    sources = mixture.parse_sources(cfg.sources)
    names = [s.name for s in sources]
    rows = []
    for s in sources:
        r = packed_rows(mixture.source_config(cfg, s), tokenizer, "train")
        if len(r) == 0:
            raise DataError(f"data.sources: the train split of source {s.name} ({s.path}) "
                            "has no tokens")
        rows.append(r)
    schedule = mixture.Schedule(sources, mixture.parse_stages(cfg.stages, names, steps),
                                mixture.parse_epochs(cfg.max_epochs, names))
    return mixture.MixtureIterator(rows, schedule, batch_size, seed, process_index,
                                   process_count)


def eval_batches_by_source(cfg, tokenizer, batch_size: int,
                           max_batches: int = 0) -> dict[str, list[dict]]:
    """A mixture's validation batches per source ({} for a single corpus)."""
    if not cfg.sources:
        return {}
    from lm.data import mixture
    return {s.name: eval_batches(mixture.source_config(cfg, s), tokenizer, batch_size,
                                 max_batches) for s in mixture.parse_sources(cfg.sources)}


def eval_batches(cfg, tokenizer, batch_size: int, max_batches: int = 0) -> list[dict]:
    """The validation rows in fixed order, batched; every row appears exactly once.

    The last batch is filled up with all-padding rows (loss_mask 0).
    `max_batches > 0` keeps only the first max_batches batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = packed_rows(cfg, tokenizer, "validation")
    if len(rows) == 0:
        key = "data.validation_corpus" if cfg.validation_corpus else "data.corpus"
        raise DataError(f"{key}: the validation split has no tokens")
    n = -(-len(rows) // batch_size)
    if max_batches > 0:
        n = min(n, max_batches)
    out = []
    for b in range(n):
        batch = [rows[r] for r in range(b * batch_size, min((b + 1) * batch_size, len(rows)))]
        batch += [rows.empty_row() for _ in range(batch_size - len(batch))]
        out.append(_stack(batch))
    return out


def target_bytes(batch: dict, tokenizer) -> np.ndarray:
    """UTF-8 bytes behind each target position (0 where loss_mask is 0).

    bits-per-byte = sum(nll * loss_mask) / ln(2) / target_bytes(batch).sum().
    """
    tb = np.asarray(tokenizer.token_bytes)[np.asarray(batch["targets"])]
    return np.where(np.asarray(batch["loss_mask"]) > 0, tb, 0).astype(np.int32)


__all__ = ["ROW_DTYPES", "ROW_KEYS", "RowIndex", "PackedRows", "build_row_index", "packed_rows",
           "train_iterator", "eval_batches", "eval_batches_by_source", "target_bytes"]
