"""Corpus formats (lm/data/sources.py), data.on_bad_shard, and `lm data prepare` at scale:
workers, resume after a kill, bounded memory (lm/data/prepare.py)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import DataError, load_documents, prepare
from lm.data.sources import FORMATS

ROOT = Path(__file__).resolve().parents[2]


def docs_for_test(n=23) -> list[str]:
    rng = np.random.default_rng(1)
    words = "alpha beta gamma délta ε zeta 東京 theta {braces} \"quoted\" new\nline".split(" ")
    return [f"doc{i} " + " ".join(rng.choice(words, int(rng.integers(1, 30))))
            for i in range(n)]


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def write_all_formats(d: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents in every format (a .txt holds one document: its own test)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from array_record.python.array_record_module import ArrayRecordWriter

    d.mkdir(parents=True, exist_ok=True)
    raw = jsonl_bytes(docs)
    out = {"jsonl": d / "a.jsonl", "gz": d / "a.jsonl.gz", "xz": d / "a.jsonl.xz",
           "zst": d / "a.jsonl.zst", "parquet": d / "a.parquet", "arrow": d / "a.arrow",
           "array_record_json": d / "j.array_record", "array_record_text": d / "t.array_record"}
    out["jsonl"].write_bytes(raw)
    out["gz"].write_bytes(gzip.compress(raw))
    out["xz"].write_bytes(lzma.compress(raw))
    # Two zstd frames: readers must not stop after the first.
    half = raw.index(b"\n", len(raw) // 2) + 1
    c = zstandard.ZstdCompressor()
    out["zst"].write_bytes(c.compress(raw[:half]) + c.compress(raw[half:]))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, out["parquet"], row_group_size=5)  # several row groups
    with pa.OSFile(str(out["arrow"]), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    for key, enc in (("array_record_json", lambda i, t: json.dumps({"text": t, "i": i})),
                     ("array_record_text", lambda i, t: t)):
        w = ArrayRecordWriter(str(out[key]), "group_size:3")
        for i, t in enumerate(docs):
            w.write(enc(i, t).encode())
        w.close()
    return out


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(corpus=str(path), seq_len=16, **kw)


def both(cfg) -> tuple[list[str], list[str]]:
    return load_documents(cfg, "train"), load_documents(cfg, "validation")


def test_every_format_reads_the_jsonl_reference(tmp_path):
    docs = docs_for_test()
    files = write_all_formats(tmp_path / "f", docs)
    reference = both(cfg_for(files["jsonl"]))
    assert reference[0] + reference[1] != [] and len(reference[1]) == 2
    for name, path in files.items():
        assert both(cfg_for(path)) == reference, name
    # A Hugging Face save_to_disk directory: Dataset, and DatasetDict (train split).
    import datasets
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=3)
    assert both(cfg_for(tmp_path / "hf")) == reference
    dd = datasets.DatasetDict({"test": ds.select(range(3)), "train": ds})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    assert both(cfg_for(tmp_path / "hfdict")) == reference
    cfg = cfg_for(tmp_path / "hfdict", validation_corpus=str(tmp_path / "hfdict"))
    assert load_documents(cfg, "validation") == docs[:3]  # validation side: `test` split
    # .txt (+ compressed): the whole file is one document.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text(docs[0])
    (tmp_path / "t" / "b.txt.gz").write_bytes(gzip.compress(docs[1].encode()))
    (tmp_path / "t" / "c.txt.xz").write_bytes(lzma.compress(docs[2].encode()))
    assert load_documents(cfg_for(tmp_path / "t", validation_fraction=0.5), "train") == [
        docs[0], docs[2]]
    assert {".jsonl", ".parquet", ".arrow", ".array_record", ".txt"} <= set(FORMATS)


@pytest.mark.parametrize("bad", ["gz", "zst", "json_line", "parquet"])
def test_a_bad_shard_fails_naming_it_or_is_skipped(tmp_path, bad, capsys):
    docs = docs_for_test(30)
    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):  # three good shards of ten documents each
        (d / f"s{i}.jsonl").write_bytes(jsonl_bytes(docs[10 * i:10 * i + 10]))
    if bad == "gz":
        name = "s1x.jsonl.gz"
        (d / name).write_bytes(gzip.compress(jsonl_bytes(["bad one"] * 50))[:-30])
    elif bad == "zst":
        name = "s1x.jsonl.zst"
        (d / name).write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 20)
    elif bad == "json_line":
        name = "s1x.jsonl"
        (d / name).write_bytes(b'{"text": "good"}\n{"text": "good 2"}\n{"text": oops\n')
    else:
        name = "s1x.parquet"
        (d / name).write_bytes(b"PAR1 not a parquet file at all")
    with pytest.raises(DataError) as e:
        load_documents(cfg_for(d), "train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.corpus: ") and name in msg
    if bad == "json_line":
        assert "line 3: invalid JSON" in msg
    with pytest.raises(DataError, match=name):
        prepare(cfg_for(d), tmp_path / "p-fail", shard_tokens=300)
    skip = cfg_for(d, on_bad_shard="skip")
    assert both(skip) == both(cfg_for(d / "s[0-9].jsonl"))  # the whole bad file left out
    err = capsys.readouterr().err
    assert err.count("warning: data.corpus: skipped 1 unreadable file") == 1 and name in err
    stats = prepare(skip, tmp_path / "p-skip", shard_tokens=300)
    assert stats["skipped_files"] == 1 and name in stats["first_skipped"]
    ref = prepare(cfg_for(d / "s[0-9].jsonl"), tmp_path / "p-ref", shard_tokens=300)
    assert shards(tmp_path / "p-skip") == shards(tmp_path / "p-ref")
    assert ref["train"]["docs"] == 27


def test_prepare_cli_exits_2_on_a_bad_shard(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    r = subprocess.run([sys.executable, "-m", "lm.cli", "data", "prepare", "--set",
                        f"data.corpus={tmp_path / 'bad.jsonl'}", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "bad.jsonl line 2: invalid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- prepare


def tree(d: Path) -> dict[str, bytes]:
    """Every file below d (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def shards(d: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(d).items() if k != "meta.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Shards of different formats and sizes, ~400 documents, one JSONL cut into parts."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(3)
    docs = [f"d{i} " + "lorem ipsum " * int(rng.integers(0, 60)) for i in range(420)]
    docs[7] = "   "  # empty documents are dropped (and not counted by the split rule)
    (d / "a.jsonl").write_bytes(jsonl_bytes(docs[:200]))  # ~ 5 parts of 3 kB
    (d / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs[200:260])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs[260:400]}), d / "c.parquet", row_group_size=20)
    (d / "d.txt").write_text(docs[400])
    (d / "e.jsonl").write_bytes(jsonl_bytes(docs[401:]))
    return d


UNIT = 3000  # bytes per work unit: several units per file


def test_prepare_streamed_equals_in_memory_and_raw_splits(corpus, tmp_path):
    from lm.data.prepare import _prepare_in_memory  # the whole-corpus path, as reference
    from lm.data.tokenizers import ByteTokenizer

    cfg = cfg_for(corpus, validation_fraction=0.15)
    stats = prepare(cfg, tmp_path / "s", shard_tokens=2000, unit_bytes=UNIT)
    assert stats["train"]["shards"] > 3 and stats["validation"]["docs"] > 10
    assert not (tmp_path / "s" / ".prepare").exists()
    (tmp_path / "m").mkdir()
    splits, _, _ = _prepare_in_memory(cfg, tmp_path / "m", ByteTokenizer(),
                                      np.dtype(np.uint16), 2000)
    assert splits == {s: stats[s] for s in ("train", "validation")}
    assert tree(tmp_path / "m") == shards(tmp_path / "s")
    prep = cfg_for(tmp_path / "s")
    assert both(prep) == both(cfg)  # the split rule held, document for document


def test_prepare_workers_2_equals_workers_1_byte_for_byte(corpus, tmp_path):
    cfg = cfg_for(corpus, validation_corpus=str(corpus / "b.jsonl.gz"))
    one = prepare(cfg, tmp_path / "w1", shard_tokens=1500, unit_bytes=UNIT, workers=1)
    two = prepare(cfg, tmp_path / "w2", shard_tokens=1500, unit_bytes=UNIT, workers=2)
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")
    assert one["sources"] == two["sources"]
    assert one["sources"]["data.validation_corpus"]["validation"]["docs"] == 60


def run_prepare(out, unit_bytes, env=None, corpus_dir=None, shard_tokens=5000
                ) -> subprocess.CompletedProcess:
    code = (f"import resource, json\n"
            f"from lm.data import prepare\nfrom lm.config import DataConfig\n"
            f"before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"s = prepare(DataConfig(corpus={str(corpus_dir)!r}), {str(out)!r}, "
            f"shard_tokens={shard_tokens}, unit_bytes={unit_bytes})\n"
            f"after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"print(json.dumps({{'grew_kb': after - before, 'tokens': s['train']['tokens']}}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_prepare_killed_midway_then_rerun_is_byte_identical(corpus, tmp_path):
    ref = run_prepare(tmp_path / "ref", UNIT, corpus_dir=corpus)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run_prepare(tmp_path / "k", UNIT, corpus_dir=corpus,
                         env={"LMLAB_FAULT": "prepare-kill@4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    work = tmp_path / "k" / ".prepare"
    assert len(list(work.glob("*.done"))) == 4 and list(work.glob("*.part"))
    assert not (tmp_path / "k" / "meta.json").exists()
    again = run_prepare(tmp_path / "k", UNIT, corpus_dir=corpus)
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree(tmp_path / "k") == tree(tmp_path / "ref")


def test_prepare_memory_is_bounded_on_a_corpus_larger_than_the_cap(tmp_path):
    # 96 MB of JSONL; prepare's peak RSS may grow by at most 24 MB (a quarter of it).
    d = tmp_path / "big"
    d.mkdir()
    line = (json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 90})
            + "\n").encode()
    block = line * ((4 << 20) // len(line))
    with open(d / "a.jsonl", "wb") as f:
        while f.tell() < 64 << 20:
            f.write(block)
    with open(d / "b.jsonl", "wb") as f:
        while f.tell() < 32 << 20:
            f.write(block)
    size = sum(p.stat().st_size for p in d.iterdir())
    # Default units: a.jsonl is one unit of 64 MB, tokenized and merged in bounded pieces.
    r = run_prepare(tmp_path / "o", 64 << 20, corpus_dir=d, shard_tokens=1 << 24)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["tokens"] > 0.85 * size
    assert out["grew_kb"] * 1024 < size / 4, out
