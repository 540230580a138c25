"""lm.data.Prefetcher: the same batches as the grain iterator it reads, and a checkpoint
state that is the CONSUMED position however far its thread has read ahead."""

from __future__ import annotations

import json
import threading
import time

import grain
import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import Prefetcher, load_tokenizer, prefetch_depth, train_iterator

BYTE = load_tokenizer("byte")


@pytest.fixture
def cfg(tmp_path) -> DataConfig:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc{i} " + " ".join(rng.choice(words, 1 + i % 20))})
                            + "\n" for i in range(30)))
    return DataConfig(corpus=str(path), seq_len=16)


def plain(cfg, **kw):
    return train_iterator(cfg, BYTE, batch_size=4, seed=3, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("depth, read_threads", [(0, 0), (1, 0), (3, 0), (2, 2)])
def test_same_batches_as_the_plain_iterator(cfg, depth, read_threads):
    want = take(plain(cfg), 25)  # past the end of an epoch (the corpus has ~12 batches)
    got = take(Prefetcher(plain(cfg, read_threads=read_threads), depth=depth), 25)
    assert_same(got, want)


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_state_is_the_consumed_position_and_round_trips(cfg, depth):
    it = Prefetcher(plain(cfg), depth=depth)
    take(it, 5)
    time.sleep(0.2)  # let the thread run ahead (fill its queue)
    state = it.get_state()
    reference = plain(cfg)
    take(reference, 5)
    assert state == reference.get_state()  # not the position the thread has read to
    after = take(it, 7)
    # Restored into a fresh prefetcher and into the same one: the batches after batch 5.
    fresh = Prefetcher(plain(cfg), depth=depth)
    fresh.set_state(state)
    assert_same(take(fresh, 7), after)
    it.set_state(state)
    assert it.get_state() == state
    assert_same(take(it, 7), after)
    it.close()
    fresh.close()


def test_transform_runs_in_the_thread_and_errors_reach_the_consumer(cfg):
    threads = set()

    def transform(batch):
        threads.add(threading.current_thread().name)
        return batch

    it = Prefetcher(plain(cfg), transform, depth=2)
    take(it, 3)
    assert threads == {"lm-prefetch"}
    it.close()

    class Broken(grain.DatasetIterator):
        def __next__(self):
            raise OSError("disk gone")

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    with pytest.raises(OSError, match="disk gone"):
        next(Prefetcher(Broken(), depth=2))


def test_grain_checkpoint_handler_saves_the_consumed_position(cfg, tmp_path):
    """The orbax item grain registers (what lm/train/checkpoint.py saves) takes a
    Prefetcher like a grain iterator and writes its consumed state."""
    from grain._src.python.checkpoint.handler import CheckpointHandler

    it = Prefetcher(plain(cfg), depth=3)
    take(it, 4)
    time.sleep(0.2)
    handler = CheckpointHandler()
    handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
    after = take(it, 3)
    restored = Prefetcher(plain(cfg), depth=3)
    handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(restored))
    assert_same(take(restored, 3), after)
    it.close()
    restored.close()


def test_auto_depth_reads_ahead_on_accelerators_only():
    # XLA:CPU's step uses the host's cores itself: a reading thread only competes with it.
    assert prefetch_depth(-1, "cpu") == 0
    assert prefetch_depth(-1, "tpu") == prefetch_depth(-1, "gpu") == 2
    assert prefetch_depth(0, "tpu") == 0 and prefetch_depth(3, "cpu") == 3  # explicit wins
