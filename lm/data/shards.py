"""Prepared token shards (written by `lm data prepare`) and the in-memory form of a split.

`TokenDocs` is the one representation the packing code consumes: flat token arrays per
shard plus document offsets, whether the tokens come from tokenizing raw text now
(lm/data/tokenized.py) or from a prepared directory, whose shards are memory-mapped,
not read. Each document is stored framed as its tokenizer frames a text, then EOS
([BOS] + ids + [EOS] for the byte tokenizer; lm/data/tokenized.py); shard s holds
`tokens[s]` (int32 or uint16) and `offsets[s]` (int64, length docs+1) with document
d = tokens[offsets[d]:offsets[d+1]]. The on-disk layout is described in prepare.py.

This module imports nothing else of lm.data but its errors, so readers (sources,
tokenized) and the writer (prepare) all depend on it and not on each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from lm.data.errors import DataError

if TYPE_CHECKING:
    from lm.data.tokenizers import Tokenizer

FORMAT = "lmlab-prepared-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


@dataclass(frozen=True, eq=False)
class TokenDocs:
    tokens: tuple[np.ndarray, ...]  # per shard, flat
    offsets: tuple[np.ndarray, ...]  # per shard, int64 [docs + 1]
    # per shard, float32 like tokens: the loss weight of predicting each token (None =
    # all 1; instruction data: 1 on responses only, lm/data/instruction.py)
    weights: tuple[np.ndarray, ...] | None = None

    @property
    def num_docs(self) -> int:
        return sum(len(o) - 1 for o in self.offsets)

    @property
    def num_tokens(self) -> int:
        return sum(int(o[-1]) for o in self.offsets)

    def iter_docs(self) -> Iterator[np.ndarray]:
        for t, o in zip(self.tokens, self.offsets):
            for d in range(len(o) - 1):
                yield np.asarray(t[o[d]:o[d + 1]])


def is_prepared_dir(path: str) -> bool:
    return bool(path) and (Path(path) / "meta.json").is_file()


def tokenizer_sha256(spec: str) -> str:
    if spec == "byte":
        return ""
    try:
        return hashlib.sha256(Path(spec).read_bytes()).hexdigest()
    except OSError:
        return ""


def read_meta(path) -> dict:
    p = Path(path) / "meta.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"data.corpus: cannot read {p}: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"data.corpus: {path} is not a prepared directory of format {FORMAT} "
            f"v{FORMAT_VERSION} (re-run `lm data prepare`)")
    return meta


def _check_tokenizer(meta: dict, tokenizer: "Tokenizer", path, key: str) -> None:
    same = meta["tokenizer"] == tokenizer.spec or (
        meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] == tokenizer_sha256(tokenizer.spec))
    if not same or meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(
            f"{key}: {path} was prepared with tokenizer {meta['tokenizer']!r} but "
            f"data.tokenizer is {tokenizer.spec!r} (re-run `lm data prepare`)")


def load_prepared(path, split: str, tokenizer: "Tokenizer | None" = None,
                  key: str = "data.corpus") -> TokenDocs:
    """Memory-map one split's shards (no tokenization, no copy)."""
    meta = read_meta(path)
    if tokenizer is not None:
        _check_tokenizer(meta, tokenizer, path, key)
    n = meta["splits"][split]["shards"]
    d = Path(path) / split
    toks, offs = [], []
    try:
        for s in range(n):
            toks.append(np.load(d / f"tokens-{s:05d}.npy", mmap_mode="r"))
            offs.append(np.load(d / f"docs-{s:05d}.npy"))
    except (OSError, ValueError) as e:
        raise DataError(f"{key}: cannot read prepared shard in {d}: {e}") from None
    return TokenDocs(tuple(toks), tuple(offs))


def load_prepared_all(path, tokenizer: "Tokenizer | None" = None,
                      key: str = "data.corpus") -> TokenDocs:
    """Both splits of a prepared dir as one (e.g. used whole as validation_corpus)."""
    parts = [load_prepared(path, s, tokenizer, key) for s in SPLITS]
    return TokenDocs(sum((p.tokens for p in parts), ()), sum((p.offsets for p in parts), ()))


__all__ = ["TokenDocs", "FORMAT", "FORMAT_VERSION", "is_prepared_dir", "read_meta",
           "load_prepared", "load_prepared_all", "tokenizer_sha256"]
