"""`lm data prepare`: tokenize a corpus once into shards that training memory-maps.

Layout of a prepared directory (FORMAT_VERSION 1):

    meta.json                       written last: its presence marks a complete dir
    train/tokens-00000.npy          flat tokens of whole documents, each framed as the
                                    tokenizer frames a text, then EOS ([BOS] + ids +
                                    [EOS] for the byte tokenizer); uint16 if vocab_size
                                    <= 65536 else int32
    train/docs-00000.npy            int64 [docs + 1] document offsets into that shard
    validation/...                  the same for the validation split

meta.json records the format version, the tokenizer spec ("byte" or an absolute
path) and the sha256 of the tokenizer file, vocab_size, the token dtype, the
source corpus settings and per split the number of docs, tokens and shards.
A prepared directory is accepted wherever a corpus is (`data.corpus=DIR`); its
splits are those computed at prepare time. Its tokenizer must match
`data.tokenizer` (same spec, or a file with the same content), else DataError.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm.data.errors import DataError
from lm.data.shards import (FORMAT, FORMAT_VERSION, TokenDocs, is_prepared_dir,
                            tokenizer_sha256)
from lm.data.sources import SPLITS
from lm.data.tokenized import token_docs
from lm.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MiB of uint16 per shard


def prepare(cfg, out_dir, tokenizer: Tokenizer | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Tokenize both splits of `cfg` (a DataConfig) into `out_dir`; return stats.

    Returns {"out_dir", "tokenizer", "vocab_size", "train": {"docs", "tokens",
    "shards"}, "validation": {...}}.
    """
    out = Path(out_dir)
    if cfg.format != "text":  # shards hold tokens only, not instruction loss weights
        raise DataError(f"prepare: data.format={cfg.format} is read directly, not prepared")
    if out.exists() and not out.is_dir():
        raise DataError(f"prepare: output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_prepared_dir(str(out)):
        raise DataError(f"prepare: output directory {out} is not empty")
    if is_prepared_dir(cfg.corpus) and Path(cfg.corpus).resolve() == out.resolve():
        raise DataError(f"prepare: output directory {out} is the corpus itself")
    tok = tokenizer or load_tokenizer(cfg.tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    stats: dict = {"out_dir": str(out), "tokenizer": tok.spec, "vocab_size": tok.vocab_size}
    # Tokenize both splits before writing anything, so a data error leaves no debris.
    docs = {split: token_docs(cfg, tok, split) for split in SPLITS}
    (out / "meta.json").unlink(missing_ok=True)  # re-preparing: invalid until done
    for split in SPLITS:
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for old in list(d.glob("tokens-*.npy")) + list(d.glob("docs-*.npy")):
            old.unlink()
        n_shards = _write_shards(docs[split], d, dtype, shard_tokens)
        stats[split] = {"docs": docs[split].num_docs, "tokens": docs[split].num_tokens,
                        "shards": n_shards}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "tokenizer": tok.spec, "tokenizer_sha256": tokenizer_sha256(tok.spec),
        "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
        "source": {"corpus": cfg.corpus, "text_field": cfg.text_field,
                   "validation_corpus": cfg.validation_corpus,
                   "validation_fraction": cfg.validation_fraction},
        "splits": {s: stats[s] for s in SPLITS},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return stats


def _write_shards(docs: TokenDocs, d: Path, dtype, shard_tokens: int) -> int:
    """Regroup whole documents into shards of about `shard_tokens` tokens."""
    shard, buf, lens, size = 0, [], [], 0

    def flush():
        nonlocal shard, buf, lens, size
        toks = np.concatenate(buf).astype(dtype) if buf else np.zeros(0, dtype)
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(np.asarray(lens, np.int64), out=offs[1:])
        np.save(d / f"tokens-{shard:05d}.npy", toks)
        np.save(d / f"docs-{shard:05d}.npy", offs)
        shard, buf, lens, size = shard + 1, [], [], 0

    for doc in docs.iter_docs():
        if size and size + len(doc) > shard_tokens:
            flush()
        buf.append(doc)
        lens.append(len(doc))
        size += len(doc)
    if buf or shard == 0:
        flush()
    return shard


__all__ = ["prepare"]
