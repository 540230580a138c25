"""Update directions through processes: Muon under fsdp x tensor sharding (8 simulated
devices) equals the unsharded result, and a muP run without a rule through the real
command (unit/test_optimizers.py: the rest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT, TINY, lm, sets, xla_flags


SHARDED = textwrap.dedent("""
    import dataclasses, json, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lm.config import MeshConfig, OptimConfig
    from lm.optim import make_optimizer
    from lm.optim.muon import muon_dims, orthogonalize
    from lm.parallel.mesh import make_mesh
    from lm.parallel.sharding import param_shardings, parse_rules
    from parallel_worker import config, pieces_for

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rng = np.random.default_rng(0)
    g = rng.normal(size=(64, 4, 16)).astype(np.float32)
    dims = muon_dims(("embed", "heads", "head_dim"))
    ortho = jax.jit(lambda x: orthogonalize(x, dims))
    whole = np.asarray(ortho(g))
    out = ortho(jax.device_put(g, NamedSharding(mesh, P("fsdp", "tensor", None))))
    # Muon's whole update (Newton-Schulz part and Adam part) on parameters sharded by the
    # logical-axis rules, against the same on one device.
    cfg = config()
    axes = {"wq": ("embed", "heads", "head_dim"), "w_in": ("embed", "mlp"),
            "embed": ("vocab", "embed"), "scale": ("embed",)}
    shapes = {"wq": (64, 4, 16), "w_in": (64, 256), "embed": (256, 64), "scale": (64,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tx = make_optimizer(dataclasses.replace(cfg.optim, name="muon"), cfg.model, axes, 10)
    def two_steps(p, g):
        s = tx.init(p)
        u, s = tx.update(g, s, p)
        u, s = tx.update(jax.tree.map(lambda x: -0.5 * x, g), s, p)
        return u
    one = jax.jit(two_steps)(params, grads)
    sh = param_shardings(axes, params, mesh, parse_rules(""))
    put = lambda t: jax.tree.map(jax.device_put, t, sh)
    many = jax.jit(two_steps)(put(params), put(grads))
    update_diff = max(float(np.max(np.abs(np.asarray(one[k]) - np.asarray(many[k])))) for k in one)
    sharded = {k: str(v.sharding.spec) for k, v in many.items()}
    # Every direction's state gets valid shardings on this mesh (lm.train's build).
    lowered = []
    for name in ("adamw", "lion", "adafactor", "muon", "sgd_sai"):
        c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name=name),
                                mesh=MeshConfig(data=2, fsdp=2, tensor=2))
        pieces = pieces_for(c, 8)
        jax.jit(pieces._init, out_shardings=pieces.state_shardings).lower()
        lowered.append(name)
    print(json.dumps({"max_diff": float(np.max(np.abs(np.asarray(out) - whole))),
                      "shards": len(out.sharding.device_set), "update_diff": update_diff,
                      "specs": sharded, "lowered": lowered}))
""")


def test_muon_equals_the_unsharded_result_under_fsdp_and_tensor_sharding():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["shards"] == 8 and r["max_diff"] < 1e-5, r
    assert r["update_diff"] < 1e-5, r
    assert "fsdp" in r["specs"]["wq"] and "tensor" in r["specs"]["w_in"], r  # really sharded
    assert r["lowered"] == ["adamw", "lion", "adafactor", "muon", "sgd_sai"]


def test_mup_without_a_rule_through_the_real_command(tmp_path):
    result = lm("train", "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, "model.init=mup", "optim.name=adafactor",
        "optim.adafactor.multiply_by_parameter_scale=true"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "model.init=mup: optim.name=adafactor has no muP rule" in result.stderr
