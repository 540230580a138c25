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

How a path corpus is prepared (bounded memory, all cores, resumable):

1. The input is cut into work units in document order (`sources.corpus_units`: a file,
   or a piece of about `unit_bytes` of an uncompressed JSONL / parquet / ArrayRecord
   file). The units depend only on the input, never on the number of workers.
2. Each unit is read, tokenized and written as it streams, by `workers` processes, to
   `OUT/.prepare/<unit id>.{tok,len}`: all its non-empty documents, in order, not yet
   split. Both are renamed into place when complete and a `<unit id>.done` marker (its
   counts) is written last, atomically. A unit's id hashes its file (path, size, mtime),
   its part, the tokenizer and text field, so a rerun after a kill skips the units
   that are done and redoes the rest (a partial unit is rewritten from its start).
3. One merge pass numbers the documents of all units globally, applies the validation
   split rule of lm/data/sources.py (`validation_mask`: the same function the in-memory
   path uses, so splits are identical) and streams the documents into the shards of
   each split (a new shard when the next document would take it past `shard_tokens`).
   meta.json is written last, then `.prepare/` is removed. The output is therefore
   byte-identical for any number of workers and after any number of interruptions.

Memory: a worker holds one batch of documents (~1 MiB of text) and its tokens, the
merge one chunk of a unit; neither depends on the corpus size. Disk: the unit files
hold the tokens a second time until the merge is done.

Corpora that are not files (the embedded "shakespeare", "passkey", a prepared dir) are
small: they are tokenized in memory and written the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.data.errors import BadShard, DataError
from lm.data.shards import FORMAT, FORMAT_VERSION, SPLITS, TokenDocs, is_prepared_dir, \
    tokenizer_sha256
from lm.data.sources import (corpus_units, file_format, is_path_corpus, read_file,
                             validation_mask, warn_skipped)
from lm.data.tokenized import token_docs, tokenize_documents
from lm.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MiB of uint16 per shard
DEFAULT_UNIT_BYTES = 64 << 20  # input bytes per work unit (its tokens land in one file)
WORK_DIR = ".prepare"
_BATCH_CHARS = 1 << 20  # characters of text tokenized in one encode_batch call
_MERGE_TOKENS = 1 << 22  # tokens of a unit copied into the shards at a time


def prepare(cfg, out_dir, tokenizer: Tokenizer | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
            unit_bytes: int = DEFAULT_UNIT_BYTES, log=None) -> dict:
    """Tokenize both splits of `cfg` (a DataConfig) into `out_dir`; return stats.

    Returns {"out_dir", "tokenizer", "vocab_size", "train": {"docs", "tokens",
    "shards"}, "validation": {...}, "sources": {key: {"spec", "train": {"docs",
    "tokens"}, "validation": {...}}}, "input_bytes", "seconds", "skipped_files",
    "first_skipped"}. `log(line)` gets progress lines (None: silent).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if cfg.format != "text":  # shards hold tokens only, not instruction loss weights
        raise DataError(f"prepare: data.format={cfg.format} is read directly, not prepared")
    if out.exists() and not out.is_dir():
        raise DataError(f"prepare: output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (
            is_prepared_dir(str(out)) or (out / WORK_DIR).is_dir()):
        raise DataError(f"prepare: output directory {out} is not empty")
    for key, spec in (("data.corpus", cfg.corpus), ("data.validation_corpus",
                                                    cfg.validation_corpus)):
        if spec and is_prepared_dir(spec) and Path(spec).resolve() == out.resolve():
            raise DataError(f"prepare: output directory {out} is {key} itself")
    if workers < 1:
        raise DataError(f"prepare: --workers must be >= 1, got {workers}")
    tok = tokenizer or load_tokenizer(cfg.tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    streamed = is_path_corpus(cfg.corpus) and (
        not cfg.validation_corpus or is_path_corpus(cfg.validation_corpus))
    if streamed:
        result = _prepare_streamed(cfg, out, tok, dtype, shard_tokens, workers, unit_bytes, log)
    else:
        result = _prepare_in_memory(cfg, out, tok, dtype, shard_tokens)
    if result is None:  # a one-document corpus: its split cuts the text (sources.holdout)
        result = _prepare_in_memory(cfg, out, tok, dtype, shard_tokens)
    splits, sources, extra = result
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "tokenizer": tok.spec, "tokenizer_sha256": tokenizer_sha256(tok.spec),
        "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "source": {"corpus": cfg.corpus, "text_field": cfg.text_field,
                   "validation_corpus": cfg.validation_corpus,
                   "validation_fraction": cfg.validation_fraction},
        "splits": splits,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return {"out_dir": str(out), "tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            **splits, "sources": sources, **extra,
            "seconds": round(time.perf_counter() - t0, 3)}


def _begin_output(out: Path) -> None:
    """Invalidate a previous result (meta.json first) and clear its shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # re-preparing: invalid until done
    for split in SPLITS:
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for old in list(d.glob("tokens-*.npy")) + list(d.glob("docs-*.npy")):
            old.unlink()


def _prepare_in_memory(cfg, out, tok, dtype, shard_tokens):
    # Tokenize both splits before writing anything, so a data error leaves no debris.
    docs = {split: token_docs(cfg, tok, split) for split in SPLITS}
    _begin_output(out)
    splits, sources = {}, {}
    for split in SPLITS:
        w = ShardWriter(out / split, dtype, shard_tokens)
        for t, o in zip(docs[split].tokens, docs[split].offsets):
            w.add(np.asarray(t), np.diff(np.asarray(o)))
        splits[split] = w.close()
        key = "data.validation_corpus" if split == "validation" and cfg.validation_corpus \
            else "data.corpus"
        src = sources.setdefault(key, {"spec": cfg.validation_corpus if key.endswith(
            "validation_corpus") else cfg.corpus})
        src[split] = {"docs": splits[split]["docs"], "tokens": splits[split]["tokens"]}
    return splits, sources, {"input_bytes": 0, "skipped_files": 0}


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    index: int  # position in the plan (document order)
    key: str  # "data.corpus" | "data.validation_corpus"
    path: str
    part: tuple | None
    nbytes: int  # input bytes it covers (of the file on disk)
    id: str


@dataclass(frozen=True)
class Job:
    """What every worker needs (picklable)."""
    work: str
    tokenizer: str
    dtype: str
    text_field: str
    on_bad_shard: str
    fault_unit: int  # LMLAB_FAULT=prepare-kill@U: die midway through unit U (tests)
    in_pool: bool


def plan_units(cfg, tok, unit_bytes: int) -> list[Unit]:
    """The work units of data.corpus (then data.validation_corpus), in document order."""
    sides = [("data.corpus", cfg.corpus)]
    if cfg.validation_corpus:
        sides.append(("data.validation_corpus", cfg.validation_corpus))
    by_file: dict = {}
    for key, spec in sides:
        for path, part in corpus_units(spec, key, unit_bytes):
            by_file.setdefault((key, path), []).append(part)
    units = []
    for (key, path), parts in by_file.items():
        st = path.stat()
        byte_ranges = file_format(path)[0].name == "jsonl"
        for k, part in enumerate(parts):
            if part is not None and byte_ranges:
                nbytes = part[1] - part[0]
            else:  # the file's size shared among its parts
                nbytes = (k + 1) * st.st_size // len(parts) - k * st.st_size // len(parts)
            ident = json.dumps([key, str(path.resolve()), st.st_size, st.st_mtime_ns, part,
                                tok.spec, tokenizer_sha256(tok.spec), cfg.text_field])
            units.append(Unit(len(units), key, str(path), tuple(part) if part else None,
                              nbytes, hashlib.sha256(ident.encode()).hexdigest()[:20]))
    return units


_TOKENIZER: dict = {}


def _worker_init() -> None:
    # Each worker is one core: the HF tokenizer's own thread pool would oversubscribe.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C


def run_unit(unit: Unit, job: Job) -> dict:
    """Tokenize one unit into its files; return its done record."""
    work = Path(job.work)
    done = work / f"{unit.id}.done"
    if done.is_file():
        return json.loads(done.read_text())
    if job.tokenizer not in _TOKENIZER:
        _TOKENIZER[job.tokenizer] = load_tokenizer(job.tokenizer)
    tok = _TOKENIZER[job.tokenizer]
    dtype = np.dtype(job.dtype)
    tok_part, len_part = work / f"{unit.id}.tok.part", work / f"{unit.id}.len.part"
    rec = {"id": unit.id, "docs": 0, "tokens": 0, "bad": None, "bad_file": None}
    batch, chars = [], 0
    try:
        with open(tok_part, "wb") as ft, open(len_part, "wb") as fl:
            def flush():
                nonlocal batch, chars
                if not batch:
                    return
                docs = tokenize_documents(batch, tok)
                docs.tokens[0].astype(dtype).tofile(ft)
                np.diff(docs.offsets[0]).astype(np.int64).tofile(fl)
                rec["docs"] += len(batch)
                rec["tokens"] += docs.num_tokens
                batch, chars = [], 0
                if unit.index == job.fault_unit:  # a partial unit on disk, then killed
                    ft.flush(), fl.flush()
                    if job.in_pool:
                        os.kill(os.getppid(), signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)

            for text in read_file(Path(unit.path), unit.key, job.text_field, unit.part):
                if not text or text.isspace():
                    continue
                batch.append(text)
                chars += len(text)
                if chars >= _BATCH_CHARS:
                    flush()
            flush()
    except BadShard as e:
        if job.on_bad_shard != "skip":
            raise
        rec.update(docs=0, tokens=0, bad=str(e), bad_file=unit.path)
        tok_part.write_bytes(b"")
        len_part.write_bytes(b"")
    os.replace(tok_part, work / f"{unit.id}.tok")
    os.replace(len_part, work / f"{unit.id}.len")
    import resource
    rec["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak of its process
    tmp = work / f"{unit.id}.done.part"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, done)
    return rec


def _start_method() -> str:
    """fork (workers start at once, sharing the parent's imports) from a single-threaded
    process; else forkserver (one fresh process imports lmlab, workers fork from it): a
    fork copies other threads' locks half-way."""
    if sys.platform != "linux":
        return "spawn"
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 2
    return "fork" if threads == 1 else "forkserver"


def _run_units(units: list[Unit], job: Job, workers: int, log) -> dict[int, dict]:
    """Done records of every unit, running those not done yet on `workers` processes."""
    work = Path(job.work)
    records: dict[int, dict] = {}
    pending = []
    for u in units:
        done = work / f"{u.id}.done"
        if done.is_file():
            records[u.index] = json.loads(done.read_text())
        else:
            pending.append(u)
    total_bytes = sum(u.nbytes for u in units)
    if log and records:
        log(f"prepare: resuming: {len(records)} of {len(units)} units already done")
    t0, last, done_bytes = time.perf_counter(), time.perf_counter(), 0
    index = {u.id: u.index for u in units}

    def note(rec):
        nonlocal last, done_bytes
        records[index[rec["id"]]] = rec
        done_bytes += units[index[rec["id"]]].nbytes
        now = time.perf_counter()
        if log and now - last >= 10:
            last = now
            log(f"prepare: {len(records)}/{len(units)} units, {done_bytes / 1e6:.0f} of "
                f"{total_bytes / 1e6:.0f} MB, {done_bytes / 1e6 / (now - t0):.1f} MB/s")

    n = min(workers, len(pending))
    if n <= 1:
        for u in pending:
            note(run_unit(u, job))
        return records
    import functools
    import multiprocessing as mp

    ctx = mp.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["lm.data.prepare"])
    with ctx.Pool(n, initializer=_worker_init) as pool:
        # Largest first keeps the cores busy to the end; the order of completion does not
        # matter (each unit has its own files; the merge follows document order).
        order = sorted(pending, key=lambda u: -u.nbytes)
        run = functools.partial(run_unit, job=Job(**{**job.__dict__, "in_pool": True}))
        for rec in pool.imap_unordered(run, order):
            note(rec)
    return records


def _prepare_streamed(cfg, out, tok, dtype, shard_tokens, workers, unit_bytes, log):
    units = plan_units(cfg, tok, unit_bytes)
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    fault = os.environ.get("LMLAB_FAULT", "")
    fault_unit = int(fault.partition("@")[2]) if fault.startswith("prepare-kill@") else -1
    job = Job(str(work), tok.spec, dtype.name, cfg.text_field, cfg.on_bad_shard, fault_unit,
              False)
    _TOKENIZER[job.tokenizer] = tok  # the in-process worker uses the caller's object
    records = _run_units(units, job, workers, log)

    # Whole files are skipped: a bad part spoils every part of its file.
    bad_files = {}
    for u in units:
        r = records[u.index]
        if r["bad"] and u.path not in bad_files:
            if cfg.on_bad_shard != "skip":
                raise BadShard(r["bad"], u.path)
            bad_files[u.path] = r["bad"]
    keep = [u for u in units if u.path not in bad_files]
    for key in dict.fromkeys(u.key for u in units):
        skipped = [BadShard(m) for p, m in bad_files.items()
                   if any(u.path == p and u.key == key for u in units)]
        if skipped:
            warn_skipped(key, skipped)
    counts = {key: sum(records[u.index]["docs"] for u in keep if u.key == key)
              for key in ("data.corpus", "data.validation_corpus")}
    for key, spec in (("data.corpus", cfg.corpus), ("data.validation_corpus",
                                                    cfg.validation_corpus)):
        if spec and counts[key] == 0:
            raise DataError(f"{key}: {spec} contains no documents")
    n_main = counts["data.corpus"]
    if n_main == 1 and not cfg.validation_corpus:
        return None

    _begin_output(out)
    writers = {s: ShardWriter(out / s, dtype, shard_tokens) for s in SPLITS}
    sources = {"data.corpus": {"spec": cfg.corpus}}
    if cfg.validation_corpus:
        sources["data.validation_corpus"] = {"spec": cfg.validation_corpus}
    for src in sources.values():
        for s in SPLITS:
            src[s] = {"docs": 0, "tokens": 0}
    first = 0  # global number of the unit's first document (of data.corpus)
    for u in keep:
        lens = np.fromfile(work / f"{u.id}.len", np.int64)
        toks = work / f"{u.id}.tok"
        if u.key == "data.corpus" and not cfg.validation_corpus:
            val = validation_mask(np.arange(first, first + len(lens)), n_main,
                                  cfg.validation_fraction)
        else:
            val = np.full(len(lens), u.key == "data.validation_corpus")
        if u.key == "data.corpus":
            first += len(lens)
        _merge_unit(toks, lens, val, writers, sources[u.key])
    splits = {s: writers[s].close() for s in SPLITS}
    bytes_in = sum(u.nbytes for u in units)
    rss = max((r.get("rss_kb", 0) for r in records.values()), default=0)
    return splits, sources, {"input_bytes": bytes_in, "skipped_files": len(bad_files),
                             "worker_peak_rss_mb": round(rss / 1024, 1),
                             **({"first_skipped": next(iter(bad_files.values()))}
                                if bad_files else {})}


def _merge_unit(path: Path, lens, val, writers, counts) -> None:
    """Copy a unit's documents into the split writers, a bounded chunk at a time (read,
    not memory-mapped: mapped pages would stay resident for the whole unit)."""
    offs = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    a = 0
    while a < len(lens):
        b = int(np.searchsorted(offs, offs[a] + _MERGE_TOKENS, side="right")) - 1
        b = max(b, a + 1)
        chunk = np.fromfile(path, writers["train"].dtype, count=int(offs[b] - offs[a]),
                            offset=int(offs[a]) * writers["train"].dtype.itemsize)
        cl, cv = lens[a:b], val[a:b]
        for split, want in (("train", False), ("validation", True)):
            sel = cv == want
            if not sel.any():
                continue
            part = chunk if sel.all() else chunk[np.repeat(sel, cl)]
            writers[split].add(part, cl[sel])
            counts[split]["docs"] += int(sel.sum())
            counts[split]["tokens"] += int(cl[sel].sum())
        a = b


# ----------------------------------------------------------------------------- writing


class _NpyStream:
    """A 1-D .npy file written as it grows: byte-identical to np.save of the whole."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        import io
        b = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            b, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                "shape": (n,)})
        h = b.getvalue()
        assert len(h) == 128, len(h)  # the same size for every 1-D length we write
        return h

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self.dtype)
        self.f.write(memoryview(a).cast("B"))
        self.n += a.size

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(self._header(self.n))
        self.f.close()


class ShardWriter:
    """Whole documents into shards of about `shard_tokens` tokens, streamed to disk: a new
    shard starts when the next document would take a non-empty one past shard_tokens."""

    def __init__(self, d: Path, dtype, shard_tokens: int):
        self.d, self.dtype, self.shard_tokens = d, np.dtype(dtype), int(shard_tokens)
        self.shard, self.size, self.tok, self.off = 0, 0, None, None
        self.docs = self.tokens = 0

    def _open(self):
        self.tok = _NpyStream(self.d / f"tokens-{self.shard:05d}.npy", self.dtype)
        self.off = _NpyStream(self.d / f"docs-{self.shard:05d}.npy", np.int64)
        self.off.write(np.zeros(1, np.int64))

    def _flush(self):
        self.tok.close()
        self.off.close()
        self.tok = self.off = None
        self.shard, self.size = self.shard + 1, 0

    def add(self, toks: np.ndarray, lens: np.ndarray) -> None:
        """Append documents: their concatenated tokens and their lengths."""
        lens = np.asarray(lens, np.int64)
        i, t = 0, 0
        while i < len(lens):
            cum = self.size + np.cumsum(lens[i:])
            j = int(np.searchsorted(cum, self.shard_tokens, side="right"))
            if j == 0:
                if self.size:
                    self._flush()
                    continue
                j = 1  # a document longer than a shard gets one of its own
            if self.tok is None:
                self._open()
            n = int(cum[j - 1] - self.size)
            self.tok.write(toks[t:t + n])
            self.off.write(cum[:j])
            self.size += n
            self.docs += j
            self.tokens += n
            i, t = i + j, t + n
            if i < len(lens):
                self._flush()

    def close(self) -> dict:
        if self.tok is None and self.shard == 0:
            self._open()  # an empty split still has shard 0
        if self.tok is not None:
            self._flush()
        return {"docs": self.docs, "tokens": self.tokens, "shards": self.shard}


__all__ = ["prepare", "ShardWriter", "DEFAULT_SHARD_TOKENS", "DEFAULT_UNIT_BYTES"]
