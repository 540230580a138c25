"""Run in a subprocess with simulated devices (XLA_FLAGS set by the caller):
`python tests/parallel_worker.py TASK JSON_ARGS` prints one JSON line of results."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax

from lm.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from lm.data import load_tokenizer, train_iterator
from lm.parallel.mesh import make_mesh
from lm.parallel.sharding import per_device_bytes
from lm.train.state import build


def config(n_kv_heads: int = 2, scan_layers: bool = False, **mesh) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4,
                          n_kv_heads=n_kv_heads, max_seq_len=64, qk_norm=True,
                          scan_layers=scan_layers),
        data=DataConfig(seq_len=32), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        mesh=MeshConfig(**mesh), batch_size=8, steps=10, seed=3)


def pieces_for(cfg: TrainConfig, n_devices: int):
    return build(cfg, make_mesh(cfg.mesh, jax.devices()[:n_devices]))


def batches(cfg: TrainConfig, n: int):
    it = train_iterator(cfg.data, load_tokenizer("byte"), cfg.batch_size, cfg.seed)
    return [next(it) for _ in range(n)]


def losses(cfg: TrainConfig, n_devices: int, steps: int = 5, state=None, data=None):
    pieces = pieces_for(cfg, n_devices)
    step = pieces.train_step()
    state = pieces.init_state() if state is None else state
    out = []
    for b in data if data is not None else batches(cfg, steps):
        state, m = step(state, pieces.global_batch(b))
        out.append(float(m["loss"]))
    return out, state, pieces


def task_layouts(args):
    results = {}
    for name, (n, mesh) in args["layouts"].items():
        cfg = config(args.get("n_kv_heads", 2), args.get("scan_layers", False), **mesh)
        out, state, pieces = losses(cfg, n)
        results[name] = {
            "losses": out,
            "param_bytes": per_device_bytes(pieces.abstract_state()["params"]),
            "state_bytes": per_device_bytes(pieces.abstract_state()),
        }
    return results


def task_hlo(args):
    cfg = config(**args["mesh"])
    pieces = pieces_for(cfg, args["devices"])
    state = pieces.init_state()
    b = pieces.global_batch(batches(cfg, 1)[0])
    text = pieces.train_step().lower(state, b).compile().as_text()
    return {op: text.count(op) for op in ("all-reduce", "all-gather", "reduce-scatter",
                                          "collective-permute", "all-to-all")}


def task_hlo_layer(args):
    """Collectives in the compiled forward of one tensor-parallel MLP and attention layer."""
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lm.parallel.sharding import activation_sharding
    cfg = dataclasses.replace(config(n_kv_heads=4, data=1, tensor=4),
                              model=dataclasses.replace(config().model, n_kv_heads=4,
                                                        vocab_size=256))
    pieces = pieces_for(cfg, 4)
    params = pieces.init_state()["params"]
    x = jax.device_put(jnp.ones((2, 32, 64)), NamedSharding(pieces.mesh, P()))
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    layers = {
        "mlp": lambda m: m.blocks[0].channel(x),
        "attention": lambda m: m.blocks[0].mixer(x, pos, jnp.ones_like(pos))[0],
    }
    out = {}
    for name, layer in layers.items():
        def forward(p, layer=layer):
            with activation_sharding(pieces.mesh, pieces.rules):
                return layer(nnx.merge(pieces.graphdef, p))
        text = jax.jit(forward).lower(params).compile().as_text()
        out[name] = {op: text.count(f" {op}(") + text.count(f" {op}-start(")
                     for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")}
    return out


def task_reshard(args):
    """Train 3 steps under fsdp=8, checkpoint, restore under data=2,tensor=4, take step 4;
    compare with step 4 taken without the save/restore."""
    from lm.train.checkpoint import Checkpointer
    cfg_a = config(data=1, fsdp=8)
    data = batches(cfg_a, 4)
    first, state, pieces_a = losses(cfg_a, 8, data=data[:3])
    it = train_iterator(cfg_a.data, load_tokenizer("byte"), cfg_a.batch_size, cfg_a.seed)
    ckpt = Checkpointer(args["dir"], every=1, keep=1)
    ckpt.save(3, state, it, force=True)
    ckpt.wait()
    reference, _, _ = losses(cfg_a, 8, state=state, data=data[3:])
    cfg_b = config(data=2, tensor=4)
    pieces_b = pieces_for(cfg_b, 8)
    restored = ckpt.restore(3, pieces_b.abstract_state(), it)
    ckpt.close()
    shard_spec = str(restored["params"]["blocks"][0]["channel"]["w_in"].sharding.spec)
    resumed, _, _ = losses(cfg_b, 8, state=restored, data=data[3:])
    return {"first": first, "reference": reference, "resumed": resumed, "spec": shard_spec}


if __name__ == "__main__":
    task, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    print(json.dumps(globals()[f"task_{task}"](json.loads(raw))))
