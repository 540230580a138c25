"""A split as tokens: flat token arrays plus document offsets.

This is the one representation the packing code consumes, whether the tokens come from
tokenizing raw text now or from the shards of a prepared directory (which are
memory-mapped, not read). Each document is stored framed as its tokenizer frames a text
(`Tokenizer.frame`: [BOS] + ids for the byte tokenizer and SentencePiece, whatever a
tokenizer.json's post-processor adds for an HF one) and closed by EOS, the document
separator packing needs (not doubled where the post-processor already ends with it);
shard s holds `tokens[s]` (int32 or uint16) and `offsets[s]` (int64, length docs+1) with
document d = tokens[offsets[d]:offsets[d+1]].
"""

from __future__ import annotations

import functools

import numpy as np

from lm.data.shards import TokenDocs, is_prepared_dir, load_prepared, load_prepared_all
from lm.data.sources import EMBEDDED_CORPORA, embedded_documents, load_documents


def tokenize_documents(texts: list[str], tokenizer, chunk: int = 256) -> TokenDocs:
    """Frame (the tokenizer's framing, then EOS) and tokenize texts into one shard."""
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(texts), np.int64)
    prefix = np.asarray(tokenizer.frame_prefix, np.int32)
    suffix = list(tokenizer.frame_suffix)
    if not suffix or suffix[-1] != tokenizer.eos_id:
        suffix.append(tokenizer.eos_id)
    suffix = np.asarray(suffix, np.int32)
    # Chunks let HF/SentencePiece tokenizers use their native batch paths.
    for s in range(0, len(texts), chunk):
        for j, ids in enumerate(tokenizer.encode_batch(texts[s:s + chunk])):
            pieces += [prefix, np.asarray(ids, np.int32), suffix]
            lengths[s + j] = len(prefix) + len(ids) + len(suffix)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return TokenDocs((tokens,), (offsets,))


def token_docs(cfg, tokenizer, split: str) -> TokenDocs:
    """The tokens of `split` of `cfg` (a DataConfig); prepared dirs are memory-mapped. A
    mixture's (data.sources) are its sources' together, in their order (its validation
    split: every source's)."""
    if cfg.sources:
        from lm.data.mixture import parse_sources, source_config
        parts = [token_docs(source_config(cfg, s), tokenizer, split)
                 for s in parse_sources(cfg.sources)]
        return TokenDocs(tuple(t for p in parts for t in p.tokens),
                         tuple(o for p in parts for o in p.offsets))
    if cfg.format == "instruction":
        from lm.data.instruction import instruction_docs
        return instruction_docs(cfg, tokenizer, split)
    if split == "validation" and cfg.validation_corpus:
        if is_prepared_dir(cfg.validation_corpus):
            return load_prepared_all(cfg.validation_corpus, tokenizer, "data.validation_corpus")
        return tokenize_documents(load_documents(cfg, split), tokenizer)
    if is_prepared_dir(cfg.corpus):
        return load_prepared(cfg.corpus, split, tokenizer, "data.corpus")
    if cfg.corpus in EMBEDDED_CORPORA:
        part = "all" if cfg.validation_corpus else split
        return _embedded_tokens(cfg.corpus, part, tokenizer.cache_key, _Passenger(tokenizer))
    return tokenize_documents(load_documents(cfg, split), tokenizer)


class _Passenger:
    """Carries a value through lru_cache without being part of the key."""

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Passenger)


@functools.lru_cache(maxsize=8)
def _embedded_tokens(corpus: str, part: str, tok_key: tuple, tok: _Passenger) -> TokenDocs:
    # Every quick run uses the embedded corpus for training and evaluation alike:
    # tokenize it once per process. Keyed by the tokenizer's cache_key (not the
    # object), so two loads of the same tokenizer share the entry.
    docs = tokenize_documents(embedded_documents(corpus, part), tok.value)
    for a in docs.tokens + docs.offsets:
        a.flags.writeable = False  # shared by every caller in this process
    return docs


__all__ = ["TokenDocs", "tokenize_documents", "token_docs"]
