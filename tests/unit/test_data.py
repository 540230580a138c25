"""Tests for lm.data: tokenizers, sources, packing, the grain pipeline, prepare."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import (DataError, eval_batches, load_documents, load_tokenizer, packed_rows,
                     prepare, target_bytes, train_iterator)
from lm.data.pipeline import PackedRows
from lm.data.sources import SHAKESPEARE_VALIDATION_WORKS, embedded_ids, _embedded
from lm.data.tokenized import TokenDocs
from lm.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

BYTE = ByteTokenizer()


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def row_key(batch, i) -> bytes:
    return b"".join(batch[k][i].tobytes() for k in ("inputs", "segment_ids"))


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A JSONL corpus of 30 distinct documents, short and long (seq_len 16 rows)."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    path = tmp_path / "small.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            n = int(rng.integers(1, 25))
            text = f"doc{i} " + " ".join(rng.choice(words, n))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(corpus=str(path), seq_len=kw.pop("seq_len", 16), **kw)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "To be, or not to be — that is the question: ☃ ü"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # truncated UTF-8 is replaced
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.token_bytes[ids].sum() == len(text.encode())
    assert tok.token_bytes[[256, 257, 258]].sum() == 0


def training_text() -> str:
    return dict(_embedded("shakespeare"))["sonnets"][:60_000]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text(training_text())
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tiny"), vocab_size=100,
        model_type="bpe", character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    return d / "tiny.model"


def test_sentencepiece_round_trip(sp_model):
    tok = load_tokenizer(str(sp_model))
    assert isinstance(tok, SentencePieceTokenizer)
    text = "Shall I compare thee to a summer's day?  Thou art more lovely"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 5
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    # The model has BOS/EOS (1, 2) but no PAD: PAD is appended after its vocabulary.
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == 100 and tok.vocab_size == 101
    assert tok.token_bytes.shape == (101,) and tok.token_bytes[[1, 2, 100]].sum() == 0
    # Byte counts match up to the dummy-prefix space SentencePiece adds.
    assert tok.token_bytes[ids].sum() in (len(text.encode()), len(text.encode()) + 1)
    assert tok.token_bytes[tok.sp.unk_id()] == 1 and tok.sp.unk_id() in tok.encode("☃")


@pytest.fixture(scope="module")
def hf_bytelevel(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([training_text()], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip(hf_bytelevel):
    tok = load_tokenizer(str(hf_bytelevel))
    assert isinstance(tok, HFTokenizer)
    text = "Shall I compare thee to a summer's day? ☃ ü"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    # GPT-2 style: <|endoftext|> (id 0) is BOS and EOS; PAD is appended.
    assert tok.bos_id == tok.eos_id == 0
    assert tok.pad_id == tok.vocab_size - 1 == 400
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.token_bytes[ids].sum() == len(text.encode())  # exact for byte-level BPE
    assert tok.token_bytes[[0, 400]].sum() == 0


def test_hf_wordlevel_without_specials_gets_appended_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["to be or not to be"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "wl.json"))
    t = load_tokenizer(str(tmp_path / "wl.json"))
    n = 5  # [UNK] to be or not
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (n, n + 1, n + 2, n + 3)
    assert t.decode(t.encode("to be or not")) == "to be or not"


def _model_tokenizer(folder: Path, bos: bool, config: dict, generation: dict | None = None):
    """A WordLevel tokenizer.json as a model directory keeps it: <s> </s> <unk> and no pad
    token, a TemplateProcessing post-processor that puts <s> first where `bos`, and
    tokenizer_config.json / generation_config.json beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<s>", "</s>", "<unk>", "to", "be", "or", "not"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return load_tokenizer(str(folder / "tokenizer.json"))


def test_a_model_tokenizer_frames_and_stops_as_its_files_say(tmp_path):
    """Special ids from tokenizer_config.json / generation_config.json, never by name and
    never appended: a missing pad is the EOS token; the post-processor's BOS frames each
    text (documents, instruction pairs); generation stops at every listed EOS id."""
    from lm.data.instruction import tokenize_records
    from lm.data.tokenized import tokenize_documents
    tok = _model_tokenizer(tmp_path / "llama", True, {"bos_token": "<s>", "eos_token": "</s>"},
                           {"bos_token_id": 0, "eos_token_id": [1, 6]})
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 1, 7)
    assert tok.stop_ids == (1, 6) and tok.frame_prefix == (0,) and tok.frame_suffix == ()
    assert list(tok.frame(tok.encode("to be"))) == [0, 3, 4]
    docs = tokenize_documents(["to be", "or not"], tok)
    assert docs.tokens[0].tolist() == [0, 3, 4, 1, 0, 5, 6, 1]
    pair = tokenize_records([("to", "be")], tok)
    assert pair.tokens[0].tolist() == [0, 3, 4, 1]
    assert pair.weights[0].tolist() == [0, 0, 1, 1]
    # Qwen / GPT-2 style: no BOS token, no post-processor: nothing before a text, EOS
    # separates documents (and stands in as BOS and pad).
    tok = _model_tokenizer(tmp_path / "qwen", False, {"eos_token": "</s>", "bos_token": None})
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 1, 1, 7)
    assert tok.stop_ids == (1,) and tok.frame_prefix == () and tok.frame_suffix == ()
    assert tokenize_documents(["to be", "or"], tok).tokens[0].tolist() == [3, 4, 1, 5, 1]
    pair = tokenize_records([("to", "be")], tok)
    assert pair.tokens[0].tolist() == [3, 4, 1] and pair.weights[0].tolist() == [0, 1, 1]


def test_byte_and_bare_tokenizers_keep_bos_first_framing(hf_bytelevel):
    """lmlab's own conventions stay where no model's files speak: the byte tokenizer and
    a bare tokenizer.json without a post-processor frame a text BOS first."""
    from lm.data.tokenized import tokenize_documents
    assert BYTE.frame(BYTE.encode("hi")).tolist() == [256, 104, 105]
    assert BYTE.stop_ids == (257,)
    assert tokenize_documents(["hi"], BYTE).tokens[0].tolist() == [256, 104, 105, 257]
    tok = load_tokenizer(str(hf_bytelevel))
    assert tok.frame_prefix == (tok.bos_id,) and tok.frame_suffix == ()


def test_a_model_tokenizer_whose_files_disagree_is_one_line(tmp_path):
    with pytest.raises(DataError, match="eos_token '</s>' .id 1. contradicts .*eos_token_id"):
        _model_tokenizer(tmp_path / "a", False, {"eos_token": "</s>"}, {"eos_token_id": 0})
    with pytest.raises(DataError, match="pad_token='<pad>' is not a token of tokenizer.json"):
        _model_tokenizer(tmp_path / "b", False, {"eos_token": "</s>", "pad_token": "<pad>"})


@pytest.mark.parametrize("spec", ["bpe", "nope.model", "nope.json", ""])
def test_unknown_tokenizer(spec):
    with pytest.raises(DataError, match="data.tokenizer") as e:
        load_tokenizer(spec)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sources


def test_shakespeare_validation_split():
    cfg = DataConfig()
    ids = embedded_ids()
    texts = dict(_embedded("shakespeare"))
    assert len(ids) == 42 and set(SHAKESPEARE_VALIDATION_WORKS) <= set(ids)
    val = load_documents(cfg, "validation")
    train = load_documents(cfg, "train")
    assert val == [texts[i] for i in ids if i in SHAKESPEARE_VALIDATION_WORKS]
    assert len(val) == 4 and len(train) == 38 and not set(val) & set(train)
    frac = sum(map(len, val)) / sum(map(len, val + train))
    assert 0.09 < frac < 0.10


def test_text_jsonl_parquet_dir_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "c"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document")
    (d / "b.jsonl").write_text('{"body": "second"}\n\n{"body": "third"}\n')
    pq.write_table(pa.table({"body": ["fourth", "fifth"]}), d / "sub" / "c.parquet")
    (d / "ignored.csv").write_text("x")
    n = {"text_field": "body", "validation_fraction": 0.5}
    assert load_documents(cfg_for(d / "a.txt", **n), "train") == ["first d"]
    assert load_documents(cfg_for(d / "a.txt", **n), "validation") == ["ocument"]
    assert load_documents(cfg_for(d / "sub" / "c.parquet", **n), "validation") == ["fifth"]
    # Directory: sorted files, recursively; every 2nd document is validation.
    docs = ["first document", "second", "third", "fourth", "fifth"]
    assert load_documents(cfg_for(d, **n), "train") == docs[0::2]
    assert load_documents(cfg_for(d, **n), "validation") == docs[1::2]
    assert load_documents(cfg_for(str(d) + "/**/*.*", **n), "train") == docs[0::2]
    # An explicit validation corpus: train is the whole corpus.
    cfg = cfg_for(d / "b.jsonl", validation_corpus=str(d / "a.txt"), **n)
    assert load_documents(cfg, "train") == ["second", "third"]
    assert load_documents(cfg, "validation") == ["first document"]


def test_holdout_rule_every_kth(small_corpus):
    cfg = cfg_for(small_corpus)  # fraction 0.1 -> every 10th document
    train, val = load_documents(cfg, "train"), load_documents(cfg, "validation")
    assert len(val) == 3 and len(train) == 27
    assert [v.split()[0] for v in val] == ["doc9", "doc19", "doc29"]


def one_line_error(cfg, match, split="train"):
    with pytest.raises(DataError, match=match) as e:
        load_documents(cfg, split)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_data_errors(tmp_path):
    one_line_error(cfg_for(tmp_path / "missing"), "data.corpus: no such file or directory")
    (tmp_path / "empty.txt").write_text("  \n")
    one_line_error(cfg_for(tmp_path / "empty.txt"), "data.corpus: .* contains no documents")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops\n')
    msg = one_line_error(cfg_for(tmp_path / "bad.jsonl"), "data.corpus: .*bad.jsonl line 2")
    assert "invalid JSON" in msg
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    one_line_error(cfg_for(tmp_path / "nofield.jsonl"), "data.text_field: .*line 2 has no field")
    (tmp_path / "p.parquet").write_bytes(b"not parquet at all")
    one_line_error(cfg_for(tmp_path / "p.parquet"), "data.corpus: cannot read")
    one_line_error(cfg_for(tmp_path / "x.csv"), "data.corpus: no such file")
    (tmp_path / "x.csv").write_text("a,b")
    one_line_error(cfg_for(tmp_path / "x.csv"), "unsupported file type")
    one_line_error(cfg_for(str(tmp_path / "nothing*.jsonl")), "no text/JSONL/Parquet files match")
    one_line_error(cfg_for(tmp_path / "empty.txt", validation_corpus=str(tmp_path / "nope")),
                   "data.validation_corpus: no such file", split="validation")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="data.validation_corpus: .* contains no documents"):
        eval_batches(cfg_for(tmp_path / "bad.jsonl", validation_corpus=str(tmp_path / "e.jsonl")),
                     BYTE, 2)


# ----------------------------------------------------------------------------- packing


def synthetic_docs(lengths, seq_len):
    """Docs whose token ids are their global positions, so every target is traceable."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.int32)
    return TokenDocs((tokens,), (offsets,)), offsets, PackedRows(
        TokenDocs((tokens,), (offsets,)), seq_len, pad_id=-1)


def check_row_invariants(row, doc_of):
    seg, inp, tgt = row["segment_ids"], row["inputs"], row["targets"]
    mask, pos = row["loss_mask"], row["positions"]
    real = seg > 0
    assert np.array_equal(mask > 0, real)
    assert np.all(inp[~real] == -1) and np.all(tgt[~real] == -1) and np.all(pos[~real] == 0)
    # Segments are contiguous, numbered 1, 2, ... and positions restart at 0 in each.
    ids = [s for s in np.unique(seg) if s > 0]
    assert ids == list(range(1, len(ids) + 1))
    docs_in_row = []
    for s in ids:
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
        assert np.array_equal(pos[idx], np.arange(len(idx)))
        # Each target is the next token of the same document.
        assert np.array_equal(tgt[idx], inp[idx] + 1)
        assert np.all(doc_of[inp[idx]] == doc_of[tgt[idx]])
        docs_in_row.append(doc_of[inp[idx[0]]])
    assert len(set(docs_in_row)) == len(docs_in_row)  # one segment per document


@pytest.mark.parametrize("seq_len", [1, 4, 16])
def test_packing_invariants_and_exact_coverage(seq_len):
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 60, size=40)
    docs, offsets, rows = synthetic_docs(lengths, seq_len)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    targets = []
    for r in range(len(rows)):
        row = rows[r]
        check_row_invariants(row, doc_of)
        targets.append(row["targets"][row["loss_mask"] > 0])
    targets = np.concatenate(targets)
    # Every token except each document's first (its BOS) is predicted exactly once.
    expected = np.setdiff1d(np.arange(offsets[-1]), offsets[:-1])
    assert np.array_equal(np.sort(targets), expected)
    assert rows.num_targets == len(expected)
    # Rows are used well: at most one partly filled row per distinct piece size.
    assert len(rows) <= -(-len(expected) // seq_len) + seq_len


def test_train_epoch_covers_corpus_once(small_corpus):
    cfg = cfg_for(small_corpus)
    rows = packed_rows(cfg, BYTE, "train")
    it = train_iterator(cfg, BYTE, batch_size=1, seed=3)
    epoch = take(it, len(rows))
    assert collections.Counter(row_key(b, 0) for b in epoch) == collections.Counter(
        row_key({k: v[None] for k, v in rows[r].items()}, 0) for r in range(len(rows)))
    train_text = load_documents(cfg, "train")
    n_targets = sum(b["loss_mask"].sum() for b in epoch)
    assert n_targets == sum(len(t.encode()) + 1 for t in train_text)  # bytes + EOS
    b = epoch[0]
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((1, 16), "int32"), "targets": ((1, 16), "int32"),
        "segment_ids": ((1, 16), "int32"), "positions": ((1, 16), "int32"),
        "loss_mask": ((1, 16), "float32")}


def test_real_batches_targets_follow_inputs():
    cfg = DataConfig(seq_len=64)
    b = next(train_iterator(cfg, BYTE, batch_size=8, seed=0))
    same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (b["segment_ids"][:, 1:] > 0)
    assert np.array_equal(b["targets"][:, :-1][same], b["inputs"][:, 1:][same])
    assert target_bytes(b, BYTE).sum() == (b["loss_mask"].astype(bool) & (b["targets"] < 256)).sum()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_differs(small_corpus):
    cfg = cfg_for(small_corpus)
    a = take(train_iterator(cfg, BYTE, 4, seed=7), 12)
    b = take(train_iterator(cfg, BYTE, 4, seed=7), 12)
    c = take(train_iterator(cfg, BYTE, 4, seed=8), 12)
    assert same_batches(a, b) and not same_batches(a, c)
    # Each epoch is reshuffled: the second epoch's order differs from the first's.
    rows = len(packed_rows(cfg, BYTE, "train"))
    one = take(train_iterator(cfg, BYTE, 1, seed=7), 2 * rows)
    assert not same_batches(one[:rows], one[rows:])


def test_resume_mid_epoch_across_epoch_boundary(small_corpus):
    cfg = cfg_for(small_corpus, seq_len=64)
    rows = len(packed_rows(cfg, BYTE, "train"))
    batch = 4
    assert 7 * batch < rows < 12 * batch  # batches 8..12 span an epoch boundary
    assert 7 * batch < 2 * rows and 12 * batch > rows  # batches 8..12 span an epoch boundary
    full = take(train_iterator(cfg, BYTE, batch, seed=1), 12)
    it = train_iterator(cfg, BYTE, batch, seed=1)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    resumed = train_iterator(cfg, BYTE, batch, seed=1)
    resumed.set_state(state)
    assert same_batches(take(resumed, 5), full[7:])


def test_process_shares_disjoint_complete_and_assemble_the_global_batch(small_corpus):
    cfg = cfg_for(small_corpus)
    rows = packed_rows(cfg, BYTE, "train")
    everything = collections.Counter(
        row_key({k: v[None] for k, v in rows[r].items()}, 0) for r in range(len(rows)))
    n = len(rows) // 2  # global batches of 2 in one epoch
    shares = [take(train_iterator(cfg, BYTE, 2, seed=5, process_index=p, process_count=2), n)
              for p in range(2)]
    seen = [collections.Counter(row_key(b, 0) for b in share) for share in shares]
    assert not set(seen[0]) & set(seen[1])
    assert sum(seen, collections.Counter()) <= everything
    assert sum(sum(c.values()) for c in seen) == 2 * n >= len(rows) - 1
    # The processes' pieces, stacked, are exactly the single-process global batches.
    single = take(train_iterator(cfg, BYTE, 4, seed=5), 6)
    parts = [take(train_iterator(cfg, BYTE, 4, seed=5, process_index=p, process_count=2), 6)
             for p in range(2)]
    assembled = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
    assert same_batches(single, assembled)


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_cover_validation_once(small_corpus):
    cfg = cfg_for(small_corpus, validation_fraction=0.25)
    rows = packed_rows(cfg, BYTE, "validation")
    batches = eval_batches(cfg, BYTE, batch_size=3)
    assert len(batches) == -(-len(rows) // 3)
    flat = [{k: b[k][i] for k in b} for b in batches for i in range(3)]
    for r in range(len(rows)):
        assert all(np.array_equal(flat[r][k], rows[r][k]) for k in flat[r])
    for pad in flat[len(rows):]:
        assert pad["loss_mask"].sum() == 0 and pad["segment_ids"].sum() == 0
    text = load_documents(cfg, "validation")
    assert sum(target_bytes(b, BYTE).sum() for b in batches) == sum(len(t.encode()) for t in text)
    assert len(eval_batches(cfg, BYTE, batch_size=1, max_batches=2)) == 2
    assert same_batches(eval_batches(cfg, BYTE, 3), batches)  # fixed order


def test_shakespeare_eval_and_train_with_subword_tokenizer(sp_model):
    tok = load_tokenizer(str(sp_model))
    cfg = DataConfig(seq_len=32)
    b = next(train_iterator(cfg, tok, batch_size=4, seed=0))
    assert b["inputs"].max() < tok.vocab_size and b["inputs"].min() >= 0
    ev = eval_batches(cfg, tok, batch_size=4, max_batches=2)
    assert len(ev) == 2 and target_bytes(ev[0], tok).sum() > ev[0]["loss_mask"].sum()


# ----------------------------------------------------------------------------- prepare


def test_prepared_dir_matches_raw_corpus(small_corpus, tmp_path, hf_bytelevel):
    for tok_spec in ("byte", str(hf_bytelevel)):
        tok = load_tokenizer(tok_spec)
        raw = cfg_for(small_corpus, seq_len=12, tokenizer=tok_spec)
        out = tmp_path / f"prep-{len(tok_spec)}"
        stats = prepare(raw, out, shard_tokens=100)  # small shards: exercise several
        meta = json.loads((out / "meta.json").read_text())
        assert stats["train"]["docs"] == 27 and stats["validation"]["docs"] == 3
        assert meta["splits"]["train"]["shards"] > 1 and meta["tokenizer"] == tok.spec
        assert np.load(out / "train" / "tokens-00000.npy").dtype == np.uint16
        prep = cfg_for(out, seq_len=12, tokenizer=tok_spec)
        assert same_batches(take(train_iterator(raw, tok, 4, seed=2), 10),
                            take(train_iterator(prep, tok, 4, seed=2), 10))
        assert same_batches(eval_batches(raw, tok, 4), eval_batches(prep, tok, 4))
        assert load_documents(prep, "validation") == load_documents(raw, "validation")
    with pytest.raises(DataError, match="prepared with tokenizer") as e:
        train_iterator(cfg_for(out, tokenizer="byte"), BYTE, 4, seed=0)
    assert "\n" not in str(e.value)


def test_prepare_shakespeare_stats(tmp_path):
    stats = prepare(DataConfig(), tmp_path / "sh")
    assert stats["train"]["docs"] == 38 and stats["validation"]["docs"] == 4
    total = sum(len(t.encode()) + 2 for t in load_documents(DataConfig(), "train"))
    assert stats["train"]["tokens"] == total
    with pytest.raises(DataError, match="not empty"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x").write_text("x")
        prepare(DataConfig(), tmp_path / "junk")
