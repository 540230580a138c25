"""Run in a subprocess with 8 simulated devices (XLA_FLAGS set by the caller):
`python tests/ring_worker.py` prints one JSON line of ring-attention checks."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lm.kernels.attention.reference import attention_reference, document_layout
from lm.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from lm.data import load_tokenizer, train_iterator
from lm.parallel.mesh import make_mesh
from lm.parallel.ring import ring_attention
from lm.parallel.sharding import DEFAULT_RULES, activation_sharding, MESH_AXES
from lm.train.state import build

# (heads, kv heads, window, sinks, packed documents, softcap)
CASES = {"mha_causal_softcap": (4, 4, 0, 0, False, 5.0),
         "gqa_segments_window_sinks": (4, 2, 8, 2, True, 0.0),
         "mqa_segments": (4, 1, 0, 0, True, 0.0)}


def function_checks(n: int, cases) -> dict:
    """ring_attention vs the dense reference: outputs, gradients, the max logit."""
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(1, 1, 1, n, 1), MESH_AXES)
    out = {}
    for name in cases:
        h, kv, window, sinks, packed, cap = CASES[name]
        b, t, d, scale = 2, 64, 16, 0.3
        kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(n), 3)
        q = jax.random.normal(kq, (b, t, h, d))
        k, v = jax.random.normal(kk, (b, t, kv, d)), jax.random.normal(kv_, (b, t, kv, d))
        # Documents that straddle shard (and zig-zag chunk) boundaries.
        seg = (jnp.where(jnp.arange(t)[None] < jnp.array([[21], [45]]), 1, 2) if packed
               else jnp.ones((b, t))).astype(jnp.int32)
        _, pos = document_layout(seg, b, t)
        opts = dict(window=window, sinks=sinks, scale=scale, softcap=cap)

        def ref(q, k, v):
            return attention_reference(q, k, v, segment_ids=seg, causal=True, **opts)

        def ring(q, k, v):
            with activation_sharding(mesh, DEFAULT_RULES):
                return ring_attention(q, k, v, pos, seg, **opts)

        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))  # noqa: E731
        o_ref, _, rowmax = ref(q, k, v)
        o_ring, mx = jax.jit(ring)(q, k, v)
        g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
        g_ring = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
        out[name] = {"out_err": float(jnp.max(jnp.abs(o_ring - o_ref))),
                     "grad_err": max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(g_ring, g_ref)),
                     "grad_scale": max(float(jnp.max(jnp.abs(r))) for r in g_ref),
                     "max_logit_err": abs(float(mx) - float(jnp.max(rowmax)))}
    return out


def config(seq_len: int, mode: str, n_layers: int = 2, **mesh) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=259, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                          max_seq_len=seq_len, attention=dataclasses.replace(
                              ModelConfig().attention, window=24, sinks=2)),
        data=DataConfig(seq_len=seq_len), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        mesh=MeshConfig(sequence_attention=mode, **mesh), batch_size=2, steps=3, seed=3)


def pieces(cfg: TrainConfig, n: int):
    return build(cfg, make_mesh(cfg.mesh, jax.devices()[:n]))


def train_losses(cfg: TrainConfig, n: int, steps: int = 2) -> list[float]:
    p = pieces(cfg, n)
    step, state = p.train_step(), p.init_state()
    it = train_iterator(cfg.data, load_tokenizer("byte"), cfg.batch_size, cfg.seed)
    out = []
    for _ in range(steps):
        state, m = step(state, p.global_batch(next(it)))
        out.append(float(m["loss"]))
    return out


def compiled(cfg: TrainConfig, n: int) -> dict:
    """Per-device temporaries and collectives of the compiled train step. K/V are the
    rank-4 gathers ([B, T, KV, Dh]); GSPMD also gathers rank-3 activations along the
    sequence for the weight gradients in both modes."""
    c, mem = pieces(cfg, n).compile_train_step()
    text = c.as_text()
    gathers = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", text)
    return {"temp": mem["temp"], "collective-permute": text.count("collective-permute"),
            "rank4_all_gathers": sum(len(g.split(",")) == 4 for g in gathers)}


def main() -> None:
    t0 = time.time()
    res = {"fn4": function_checks(4, ["mha_causal_softcap", "gqa_segments_window_sinks"]),
           "fn8": function_checks(8, ["mqa_segments"])}
    # The model: one training run per layout; packed rows (the Shakespeare pipeline
    # packs documents), GQA, a window with sinks.
    res["t_fn"] = time.time() - t0
    res["losses"] = {"single": train_losses(config(64, "allgather", data=1), 1),
                     "allgather4": train_losses(config(64, "allgather", data=2, sequence=4), 8),
                     "ring4": train_losses(config(64, "ring", data=2, sequence=4), 8),
                     "ring4_tensor2": train_losses(config(64, "ring", data=1, sequence=4,
                                                          tensor=2), 8)}
    res["t_losses"] = time.time() - t0
    # Compiled steps at a length where the scores dominate the temporaries.
    res["compiled"] = {f"{mode}{n}": compiled(config(512, mode, 1, data=1, sequence=n), n)
                       for mode in ("allgather", "ring") for n in (4, 8)}
    res["t_all"] = time.time() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
