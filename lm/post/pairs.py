"""Preference pairs (`data.preferences`): JSONL records

    {"prompt": str, "chosen": str, "rejected": str}
    {"messages": [{role, content}, ...], "chosen": str, "rejected": str}

each rendered twice, prompt + chosen and prompt + rejected, as instruction data renders
a prompt/response record or a chat (lm/data/instruction.py `tokenize_records`: framed
by the tokenizer with EOS, or through the tokenizer's chat template with the completion
as the final assistant turn, role-tagged lines without one). The loss mask covers the
completion's tokens only (and the EOS / end-of-turn that closes it; a chat's earlier
assistant turns are context). A pair is two rows of data.seq_len, one document each,
never packed: row 2i chosen, 2i + 1 rejected (the row format of lm/data/pipeline.py,
so batches travel the same way); a completion longer than the row leaves is cut at the
row's end (both rows share the prompt, so the comparison stays fair), a prompt that
leaves no room for a completion token is an error naming the record.

Order: the pairs are shuffled by the data seed and reshuffled each epoch (grain), a
step takes batch_size / 2 of them; the iterator is grain's, checkpointed with the state
like the pretraining pipeline's, so a resumed run reads exactly the pairs the
uninterrupted one would. The validation split is the same deterministic hold-out by
record position as instruction data (lm/data/sources.py holdout), or
data.validation_corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grain
import numpy as np

from lm.data.errors import DataError
from lm.data.instruction import Chat, _chat, tokenize_records
from lm.data.pipeline import ROW_DTYPES, ROW_KEYS, host_batches
from lm.data.shards import TokenDocs
from lm.data.sources import corpus_files, holdout


@dataclass(frozen=True)
class Pair:
    """A preference record, checked, and where it came from (for error lines)."""
    prompt: str | tuple  # a prompt string, or the chat's messages before the completion
    chosen: str
    rejected: str
    where: str

    def records(self) -> list:
        """(prompt + chosen, prompt + rejected) as instruction records."""
        if isinstance(self.prompt, str):
            return [(self.prompt, self.chosen), (self.prompt, self.rejected)]
        return [_chat([*self.prompt, {"role": "assistant", "content": c}], self.where)
                for c in (self.chosen, self.rejected)]


def read_pairs(spec: str, key: str) -> list[Pair]:
    """The pairs of every JSONL file named by `spec`, in order; DataError (one line
    naming the record) for a record that is not a pair."""
    out = []
    for path in corpus_files(spec, key):
        if not path.name.endswith((".jsonl", ".ndjson")):
            raise DataError(f"{key}: {path.name}: preference pairs must be JSONL")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    out.append(_pair(line, f"{key}: {path} line {n}"))
    if not out:
        raise DataError(f"{key}: {spec} holds no preference pairs")
    return out


def _pair(line: str, where: str) -> Pair:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a pair is an object with prompt (or messages), chosen "
                        "and rejected")
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise DataError(f"{where}: missing {field!r}")
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: {field!r} must be a string")
        if not obj[field].strip():
            raise DataError(f"{where}: {field!r} is an empty completion")
    if isinstance(obj.get("prompt"), str):
        prompt = obj["prompt"]
    elif "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{role, content}")
        # Checked as a chat with the completion as its last turn.
        prompt = _chat([*messages, {"role": "assistant", "content": obj["chosen"]}],
                       where).messages[:-1]
    else:
        raise DataError(f"{where}: needs a 'prompt' string or a 'messages' list")
    return Pair(prompt, obj["chosen"], obj["rejected"], where)


class PairRows:
    """Random-access source of pairs (grain's protocol): item i = pair i's two rows,
    each key [2, T] (chosen, rejected)."""

    def __init__(self, pairs: list[Pair], tokenizer, seq_len: int):
        from lm.data.chat_template import find_chat_template
        self.seq_len, self.pad_id = int(seq_len), int(tokenizer.pad_id)
        records = [r for p in pairs for r in p.records()]
        template = (find_chat_template(tokenizer)
                    if any(isinstance(r, Chat) for r in records) else None)
        self.docs: TokenDocs = tokenize_records(records, tokenizer, template,
                                                last_turn_only=True)
        offsets, weights = self.docs.offsets[0], self.docs.weights[0]
        for i, pair in enumerate(pairs):  # a prompt must leave room for the completion
            for d in (2 * i, 2 * i + 1):
                learned = np.flatnonzero(weights[offsets[d] + 1:offsets[d + 1]] > 0)
                # target j predicts token j + 1: the completion starts at token learned[0] + 1
                if learned[0] >= self.seq_len:
                    raise DataError(
                        f"{pair.where}: the prompt is {learned[0] + 1} tokens, "
                        f"data.seq_len={self.seq_len} leaves no room for the completion")
        self.n = len(pairs)

    def __len__(self) -> int:
        return self.n

    def _row(self, d: int) -> dict:
        T = self.seq_len
        row = empty_row(T, self.pad_id)
        a, b = int(self.docs.offsets[0][d]), int(self.docs.offsets[0][d + 1])
        toks = np.asarray(self.docs.tokens[0][a:b], np.int32)[:T + 1]
        w = np.asarray(self.docs.weights[0][a:b], np.float32)[:T + 1]
        m = len(toks) - 1
        row["inputs"][:m], row["targets"][:m] = toks[:-1], toks[1:]
        row["segment_ids"][:m] = 1
        row["positions"][:m] = np.arange(m)
        row["loss_mask"][:m] = w[1:]
        return row

    def __getitem__(self, i) -> dict:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        c, r = self._row(2 * i), self._row(2 * i + 1)
        return {k: np.stack([c[k], r[k]]) for k in ROW_KEYS}


def empty_row(seq_len: int, pad_id: int) -> dict:
    pad = {"inputs": pad_id, "targets": pad_id}
    return {k: np.full(seq_len, pad.get(k, 0), dt) for k, dt in ROW_DTYPES.items()}


def _stack_pairs(items) -> dict:
    """Pairs [2, T] -> rows [2 * pairs, T], 2i chosen and 2i + 1 rejected."""
    return {k: np.stack([it[k] for it in items]).reshape(-1, items[0][k].shape[-1])
            for k in ROW_KEYS}


def pair_rows(cfg, tokenizer, split: str) -> PairRows:
    """The pairs of one split of cfg (a DataConfig) as rows."""
    if split == "validation" and cfg.validation_corpus:
        pairs = read_pairs(cfg.validation_corpus, "data.validation_corpus")
    else:
        pairs = read_pairs(cfg.preferences, "data.preferences")
        if not cfg.validation_corpus:
            if len(pairs) < 2:
                raise DataError(f"data.preferences: {cfg.preferences} has one pair: nothing "
                                "to hold out for validation (add pairs or set "
                                "data.validation_corpus)")
            pairs = holdout(pairs, cfg.validation_fraction, split)
    return PairRows(pairs, tokenizer, cfg.seq_len)


def pair_iterator(cfg, tokenizer, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, read_threads: int = 0) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's rows of each global batch
    (`batch_size` rows = batch_size / 2 pairs): the pairs shuffled by `seed` into one
    global stream, process p reading its consecutive share of each batch's pairs (as
    lm/data/pipeline.py train_iterator does with rows)."""
    pairs = batch_size // 2
    if batch_size % 2 or pairs % process_count:
        raise DataError(f"batch_size={batch_size}: preference batches are pairs of rows; "
                        f"the {pairs} pairs must divide by the {process_count} processes")
    rows = pair_rows(cfg, tokenizer, "train")
    if len(rows) == 0:
        raise DataError(f"data.preferences: the train split of {cfg.preferences} has no pairs")
    return host_batches(rows, pairs, seed, process_index, process_count, read_threads,
                        _stack_pairs)


def pair_eval_batches(cfg, tokenizer, batch_size: int, max_batches: int = 0) -> list[dict]:
    """The validation pairs in fixed order, batch_size / 2 per batch, each once; the last
    batch filled up with empty pairs (no response tokens: they count nowhere)."""
    rows = pair_rows(cfg, tokenizer, "validation")
    if len(rows) == 0:
        key = "data.validation_corpus" if cfg.validation_corpus else "data.preferences"
        raise DataError(f"{key}: the validation split has no pairs")
    per = batch_size // 2
    n = -(-len(rows) // per)
    if max_batches > 0:
        n = min(n, max_batches)
    empty = {k: np.stack([v, v]) for k, v in empty_row(rows.seq_len, rows.pad_id).items()}
    out = []
    for b in range(n):
        items = [rows[i] for i in range(b * per, min((b + 1) * per, len(rows)))]
        out.append(_stack_pairs(items + [empty] * (per - len(items))))
    return out


__all__ = ["Pair", "PairRows", "read_pairs", "pair_rows", "pair_iterator",
           "pair_eval_batches"]
