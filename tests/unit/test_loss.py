"""The chunked cross-entropy: the same losses and gradients as the whole-sequence one,
without the [batch, seq, vocab] float32 logits in the compiled step's memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from lm.config import resolve
from lm.model import Transformer
from lm.train.state import build
from lm.train.step import loss_chunk_for, loss_sums, token_losses


def _setup(*extra):
    cfg = resolve("configs/default.py", TINY + ["model.vocab_size=300", *extra])
    model = Transformer(cfg.model, nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    b, t = 4, cfg.data.seq_len
    batch = {"inputs": jnp.asarray(rng.integers(0, 300, (b, t)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 300, (b, t)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.asarray(rng.random((b, t)) < 0.9, jnp.float32)}
    return cfg, graphdef, params, batch


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(tied):
    cfg, graphdef, params, batch = _setup(f"model.tie_embeddings={str(tied).lower()}",
                                          "model.logit_softcap=30")
    whole = token_losses(graphdef, params, batch, 0)
    chunked = token_losses(graphdef, params, batch, 8)
    for a, b in zip(whole[:3], chunked[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def loss(p, chunk):
        return loss_sums(graphdef, p, batch, 1e-4, jnp.sum(batch["loss_mask"]), chunk)[0]
    g0, g1 = jax.grad(loss)(params, 0), jax.grad(loss)(params, 8)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_chunks_large_vocabularies_only():
    assert loss_chunk_for(-1, 259, 2048) == 0
    assert loss_chunk_for(-1, 128_256, 2048) == 512
    assert loss_chunk_for(-1, 32_768, 384) == 0   # the chunk would be the whole sequence
    assert loss_chunk_for(300, 100, 2048) == 256  # the largest divisor not above it
    assert loss_chunk_for(0, 128_256, 2048) == 0  # explicitly off


def test_chunked_loss_keeps_the_logits_out_of_memory():
    # vocab 32k, seq 256, batch 4: the f32 logits alone are 128 MiB (and their gradient
    # as much again); chunks of 32 positions hold an eighth of that at a time.
    temps = {}
    for chunk in (0, 32):
        cfg = resolve("configs/default.py", TINY + [
            "model.vocab_size=32768", "data.seq_len=256", "model.max_seq_len=256",
            f"loss_chunk={chunk}"])
        pieces = build(cfg)
        _, memory = pieces.compile_train_step()
        temps[chunk] = memory["temp"]
    logits_bytes = 4 * 256 * 32768 * 4
    assert temps[0] - temps[32] > logits_bytes, temps


def test_chunked_loss_with_gradient_accumulation_matches_one_batch():
    # The chunk size is bound in the step (not traced): accumulation's eval_shape once
    # traced it and failed.
    losses = {}
    for accum in (1, 2):
        cfg = resolve("configs/default.py", TINY + ["model.vocab_size=300", "loss_chunk=8",
                                                    f"grad_accum={accum}"])
        pieces = build(cfg)
        _, _, _, batch = _setup()
        state = pieces.init_state()
        state, metrics = pieces.train_step()(state, pieces.global_batch(
            {k: np.asarray(v) for k, v in batch.items()}))
        losses[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    np.testing.assert_allclose(losses[1], losses[2], rtol=1e-5)
