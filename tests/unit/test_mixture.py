"""Data mixtures (lm/data/mixture.py): sampling frequencies, stages, resumption, caps, one
source = the single-corpus pipeline, the processes' shares, bad configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lm.config import ConfigError, DataConfig
from lm.data import DataError, load_tokenizer, train_iterator
from lm.data.mixture import (MixtureIterator, Schedule, parse_epochs, parse_sources,
                             parse_stages)


class Rows:
    """A source of `n` rows, each marked with its source and index (what a packed-row
    source gives, reduced to what the mixture moves around)."""

    def __init__(self, source: int, n: int, seq_len: int = 4):
        self.source, self.n, self.seq_len = source, n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"source": np.int32(self.source), "row": np.int32(i)}


def mixture(sources: str, stages: str = "", caps: str = "", sizes=(1000, 1000), batch=8,
            seed=0, steps=100, process_index=0, process_count=1) -> MixtureIterator:
    srcs = parse_sources(sources)
    names = [s.name for s in srcs]
    schedule = Schedule(srcs, parse_stages(stages, names, steps), parse_epochs(caps, names))
    return MixtureIterator([Rows(i, n) for i, n in enumerate(sizes)], schedule, batch, seed,
                           process_index, process_count, announce=lambda line: None)


def test_sources_are_drawn_as_their_weights_say():
    it = mixture("a:0.7:x;b:0.3:y", sizes=(10**6, 10**6))
    picks = np.concatenate([next(it)["source"] for _ in range(2000)])
    n, p = len(picks), 0.3
    share = float(np.mean(picks == 1))
    assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), share
    # each source gives its own stream's rows in order: no row twice within an epoch
    rows_b = np.concatenate([r["row"] for r in [next(it) for _ in range(10)]])
    assert len(rows_b) == 80


def test_stages_switch_at_their_step_and_fraction():
    it = mixture("a:1:x;b:1:y", stages="10:a=1;0.2:b=1", steps=100)
    sources = [set(next(it)["source"].tolist()) for _ in range(30)]
    assert all(s == {0} for s in sources[:10])  # steps 1..10
    assert all(s == {1} for s in sources[10:30])  # steps 11..20, and after the last stage
    with pytest.raises(ConfigError, match="must increase"):
        parse_stages("0.5:a=1;10:a=1", ["a"], 100)


def test_resume_from_a_state_repeats_nothing_and_skips_nothing():
    full = mixture("a:0.5:x;b:0.5:y", stages="12:a=0.9,b=0.1;1.0:a=0.1,b=0.9", sizes=(50, 70))
    batches = [next(full) for _ in range(30)]
    part = mixture("a:0.5:x;b:0.5:y", stages="12:a=0.9,b=0.1;1.0:a=0.1,b=0.9", sizes=(50, 70))
    for _ in range(9):
        next(part)
    state = part.get_state()
    again = mixture("a:0.5:x;b:0.5:y", stages="12:a=0.9,b=0.1;1.0:a=0.1,b=0.9", sizes=(50, 70))
    again.set_state(state)
    for b in range(9, 30):  # across the stage switch at step 12 and both sources' epochs
        got = next(again)
        assert all(np.array_equal(got[k], batches[b][k]) for k in got), b
    # a later stage edited before resuming changes only what comes after the resume
    edited = mixture("a:0.5:x;b:0.5:y", stages="12:a=0.9,b=0.1;1.0:a=1", sizes=(50, 70))
    edited.set_state(state)
    later = [next(edited) for _ in range(21)]
    assert all(np.array_equal(later[b - 9]["source"], batches[b]["source"]) for b in range(9, 12))
    assert all(set(x["source"].tolist()) == {0} for x in later[3:])


def test_processes_read_their_share_of_the_same_global_batches():
    whole = mixture("a:0.6:x;b:0.4:y", batch=8)
    parts = [mixture("a:0.6:x;b:0.4:y", batch=8, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(20):
        w = next(whole)
        got = [next(p) for p in parts]
        for k in w:
            assert np.array_equal(np.concatenate([g[k] for g in got]), w[k])


def test_a_capped_source_leaves_the_mixture_and_all_used_up_is_one_line():
    lines = []
    it = mixture("a:0.5:x;b:0.5:y", caps="a=1", sizes=(16, 10**6), batch=8)
    it.announce = lines.append
    picks = np.concatenate([next(it)["source"] for _ in range(40)])
    assert int(np.sum(picks == 0)) == 16  # one epoch of a, then only b
    assert any("source a is used up after 1 epoch" in line for line in lines)
    it = mixture("a:1:x;b:0:y", caps="a=1", sizes=(16, 100), batch=8)
    next(it), next(it)
    with pytest.raises(DataError, match="every source with weight at step 3 \\(a\\) is used up"):
        next(it)
    assert it.drawn(2) == {"tokens/a": 64.0, "tokens/b": 0.0, "epochs/a": 1.0, "epochs/b": 0.0}


def test_repeats_are_announced():
    lines = []
    it = mixture("a:1:x", sizes=(20,), batch=8)
    it.announce = lines.append
    for _ in range(6):
        next(it)
    assert lines and lines[0] == "data: source a repeats: epoch 2 starts at batch 3"


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_mixture_of_one_source_is_the_single_corpus_pipeline(process_count):
    cfg = DataConfig(seq_len=64)
    tok = load_tokenizer("byte")
    one = dataclasses.replace(cfg, sources="plays:1:shakespeare")
    for p in range(process_count):
        a = train_iterator(cfg, tok, 8, seed=3, process_index=p, process_count=process_count)
        b = train_iterator(one, tok, 8, seed=3, process_index=p, process_count=process_count)
        for _ in range(5):
            x, y = next(a), next(b)
            assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("sources, stages, caps, message", [
    ("a:-1:x", "", "", "a's weight must be >= 0"),
    ("a:0:x;b:0:y", "", "", "every weight is 0"),
    ("a:1:x", "0.5:b=1", "", "unknown source 'b'"),
    ("a:1", "", "", "is not name:weight:path"),
    ("a:1:x;a:2:y", "", "", "named twice"),
    ("a:1:x", "0.5:a=0", "", "weighs every source 0"),
    ("a:1:x", "1.5:a=1", "", "is not in (0, 1]"),
    ("a:1:x", "", "a=0", "must be > 0"),
])
def test_bad_mixtures_are_one_line(sources, stages, caps, message):
    from lm.config import TrainConfig, validate
    cfg = TrainConfig(data=DataConfig(sources=sources, stages=stages, max_epochs=caps))
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        validate(cfg)
