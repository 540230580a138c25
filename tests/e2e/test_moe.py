"""Mixture of experts (lm/model/mixers/moe.py): the layer against a per-token loop
reference (forward and gradients), one expert = the dense MLP, capacity drops, the
balancing losses and bias, the megablox kernel against ragged_dot, expert-parallel
training against one device, the TPU compile, accounting and bad configs."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, lm, sets, simulated_devices_result, train_losses
from flax import nnx

from lm.config import ModelConfig
from lm.model.mixers.mlp import MLP, MLPConfig
from lm.model.mixers.moe import MoE, MoEConfig, capacity, route


def model_cfg(**moe) -> ModelConfig:
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, vocab_size=50, channel_pattern="e",
                       moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "ratio": 2.0, **moe}))


def reference(layer: MoE, cfg: MoEConfig, x_BTD):
    """Each token through its top-k experts one at a time, gate-weighted (plus the shared
    experts), in plain jnp: the definition the grouped, sorted computation must equal."""
    x = x_BTD.reshape(-1, x_BTD.shape[-1])
    logits = x @ layer.router[...]
    scores = jax.nn.softmax(logits, -1) if cfg.router == "softmax" else jax.nn.sigmoid(logits)
    act = jax.nn.gelu if cfg.activation == "gelu" else None
    rows = []
    for n in range(x.shape[0]):
        top = np.argsort(-np.asarray(jax.lax.stop_gradient(scores[n])), kind="stable")[:cfg.top_k]
        gates = scores[n, top]
        if cfg.renormalize:
            gates = gates / gates.sum()
        y = 0.0
        for j, e in enumerate(top):
            pre = x[n] @ layer.w_in[...][e]
            h = act(pre) if act else jax.nn.silu(x[n] @ layer.w_gate[...][e]) * pre
            y = y + gates[j] * (h @ layer.w_out[...][e])
        if cfg.n_shared_experts:
            pre = x[n] @ layer.shared.w_in[...]
            h = act(pre) if act else jax.nn.silu(x[n] @ layer.shared.w_gate[...]) * pre
            y = y + h @ layer.shared.w_out[...].T
        rows.append(y)
    return jnp.stack(rows).reshape(x_BTD.shape)


CASES = [
    dict(top_k=1),
    dict(top_k=2),
    dict(top_k=4),
    dict(top_k=2, n_shared_experts=1, activation="swiglu"),
    dict(top_k=2, router="sigmoid"),
    dict(top_k=2, router="sigmoid", renormalize=False),
]


@pytest.mark.parametrize("knobs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_dropless_layer_matches_the_per_token_reference_and_its_gradients(knobs):
    cfg = model_cfg(**knobs)
    layer = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    y, stats = layer(x)
    np.testing.assert_allclose(y, reference(layer, cfg.moe, x), atol=1e-5)
    assert float(stats["dropped"]) == 0.0

    graphdef, params = nnx.split(layer)
    probe = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def objective(fn):
        return lambda p, x: jnp.sum(fn(nnx.merge(graphdef, p), x) * probe)

    ours = jax.grad(objective(lambda m, x: m(x)[0]), argnums=(0, 1))(params, x)
    ref = jax.grad(objective(lambda m, x: reference(m, cfg.moe, x)), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_expert_top_1_is_the_dense_mlp():
    cfg = dataclasses.replace(model_cfg(n_experts=1, top_k=1, ratio=4.0),
                              mlp=MLPConfig(ratio=4.0))
    moe, mlp = MoE(cfg, nnx.Rngs(0)), MLP(cfg, nnx.Rngs(1))
    mlp.w_in[...] = moe.w_in[...][0]
    mlp.w_out[...] = moe.w_out[...][0].T  # the MLP stores its out-projection [d, f]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 16))
    np.testing.assert_allclose(moe(x)[0], mlp(x), atol=1e-6)


def test_capacity_drops_exactly_the_assignments_over_capacity():
    cfg = model_cfg(n_experts=4, top_k=1, capacity_factor=1.0)
    layer = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 16, 16))
    # Route every token to expert 2: a router whose column 2 dominates.
    layer.router[...] = jnp.zeros((16, 4)).at[:, 2].set(1.0)
    x = jnp.abs(x)  # positive inputs: column 2 wins for every token
    y, stats = layer(x)
    cap = capacity(cfg.moe, 16)  # ceil(1.0 * 16 * 1 / 4) = 4
    assert cap == 4
    # The first `cap` tokens (token order) get expert 2; the others pass through (zero
    # output: the residual carries them unchanged).
    dropless = reference(layer, cfg.moe, x)
    np.testing.assert_allclose(y[0, :cap], dropless[0, :cap], atol=1e-6)
    np.testing.assert_array_equal(y[0, cap:], 0.0)
    assert float(stats["dropped"]) == pytest.approx((16 - cap) / 16)
    np.testing.assert_allclose(stats["load"], [0, 0, 1, 0])


def test_aux_loss_is_the_switch_definition_on_a_hand_computed_case():
    cfg = MoEConfig(n_experts=2, top_k=1, renormalize=False)
    # Two tokens, both prefer expert 0 with probabilities 0.75 and 0.6.
    logits = jnp.log(jnp.array([[0.75, 0.25], [0.6, 0.4]]))
    x = jnp.eye(2)
    experts, gates, stats = route(cfg, x, logits, None)
    np.testing.assert_array_equal(experts[:, 0], [0, 0])
    # f = (1, 0), P = (0.675, 0.325): aux = E * sum f P = 2 * 0.675
    assert float(stats["aux_loss"]) == pytest.approx(1.35, rel=1e-6)
    lse = jax.nn.logsumexp(logits, -1)
    assert float(stats["z_loss"]) == pytest.approx(float(jnp.mean(lse ** 2)), rel=1e-5)
    np.testing.assert_allclose(gates[:, 0], [0.75, 0.6], rtol=1e-6)
    assert float(stats["load_ratio"]) == np.inf


def test_balancing_bias_moves_a_skewed_router_toward_uniform_load():
    cfg = model_cfg(n_experts=4, top_k=1, bias_rate=0.002, aux_loss=0.0)
    layer = MoE(cfg, nnx.Rngs(0))
    layer.router[...] = layer.router[...].at[:, 0].add(0.1)  # skewed toward expert 0
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 16)) + 0.5  # (for inputs > 0)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state):  # the train step's rule, without gradient steps
        model = nnx.merge(graphdef, state)
        stats = model(x)[1]
        p = {"router_bias": model.router_bias[...]}
        model.router_bias[...] = MoE.update_outside_gradient(cfg, p, p, stats)["router_bias"]
        return nnx.state(model), stats["load"]

    loads = []
    for _ in range(300):
        state, load = step(state)
        loads.append(np.asarray(load))
    assert loads[0][0] > 0.9  # nearly every token on expert 0 at first
    assert np.max(loads[-50:]) < 0.35  # then every expert near 1/4
    assert nnx.merge(graphdef, state).router_bias[...][0] < 0  # expert 0 pushed down


@pytest.mark.parametrize("m, sizes", [(40, [10, 0, 23]), (300, [7, 130, 0, 160]), (3, [1, 2])])
def test_blocked_grouped_matmul_matches_ragged_dot(m, sizes):
    from lm.kernels.grouped_matmul import grouped_matmul
    g = len(sizes)
    x = jax.random.normal(jax.random.PRNGKey(6), (m, 24))
    w = jax.random.normal(jax.random.PRNGKey(7), (g, 24, 16))
    sizes = jnp.array(sizes, jnp.int32)  # rows after the groups are padding
    for fn in (lambda x, w: grouped_matmul(x, w, sizes, "blocked"),
               jax.grad(lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, "blocked"))),
                        argnums=(0, 1))):
        got = fn(x, w)
        want = (grouped_matmul(x, w, sizes, "ragged") if not isinstance(got, tuple) else
                jax.grad(lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, "ragged"))),
                         argnums=(0, 1))(x, w))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_megablox_kernel_matches_ragged_dot_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    from lm.kernels.grouped_matmul import grouped_matmul
    x = jax.random.normal(jax.random.PRNGKey(6), (40, 24))
    w = jax.random.normal(jax.random.PRNGKey(7), (3, 24, 16))
    sizes = jnp.array([10, 0, 23], jnp.int32)  # 7 padding rows after the groups
    ref = grouped_matmul(x, w, sizes, "ragged")
    with pltpu.force_tpu_interpret_mode():
        out = grouped_matmul(x, w, sizes, "megablox")
        grads = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, "megablox") ** 2),
                         argnums=(0, 1))(x, w)
    ref_grads = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, "ragged") ** 2),
                         argnums=(0, 1))(x, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[33:], 0.0)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


EP_SCRIPT = r"""
import json
import jax, numpy as np
from lm.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from lm.model.mixers.moe import MoEConfig
from lm.data import load_tokenizer, train_iterator
from lm.parallel.mesh import make_mesh
from lm.train.state import build

moe = MoEConfig(n_experts=4, top_k=2, ratio=2.0, n_shared_experts=1, bias_rate=0.01)

def run(n, scan, **mesh):
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                          channel_pattern="e" if scan else "fe", scan_layers=scan, moe=moe),
        data=DataConfig(seq_len=16), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        mesh=MeshConfig(**mesh), batch_size=8, steps=10, seed=3)
    pieces = build(cfg, make_mesh(cfg.mesh, jax.devices()[:n]))
    step = pieces.train_step()
    state = pieces.init_state()
    it = train_iterator(cfg.data, load_tokenizer("byte"), cfg.batch_size, cfg.seed)
    losses = []
    for _ in range(3):
        state, m = step(state, pieces.global_batch(next(it)))
        losses.append(float(m["loss"]))
    text = step.lower(state, pieces.global_batch(next(it))).compile().as_text()
    return {"losses": losses, "all_to_all": text.count("all-to-all"),
            "load": np.asarray(m["moe_load"][1]).tolist()}

out = {}
for scan in (False, True):
    out[f"single/{scan}"] = run(1, scan, data=1)
    out[f"expert=4,data=2/{scan}"] = run(8, scan, data=2, expert=4)
    out[f"expert=2,fsdp=2,tensor=2/{scan}"] = run(8, scan, data=1, expert=2, fsdp=2, tensor=2)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_expert_parallel_training_gives_the_single_device_losses():
    out = simulated_devices_result(EP_SCRIPT, devices=8)
    for scan in (False, True):
        single = out[f"single/{scan}"]
        assert single["all_to_all"] == 0
        for layout in ("expert=4,data=2", "expert=2,fsdp=2,tensor=2"):
            got = out[f"{layout}/{scan}"]
            np.testing.assert_allclose(got["losses"], single["losses"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["load"], single["load"], atol=1e-6)
            assert got["all_to_all"] > 0, layout  # the dispatch really crosses devices


MOE = ["model.channel_pattern=fe", "model.moe.n_experts=4", "model.moe.top_k=2",
       "model.moe.ratio=2", "model.moe.bias_rate=0.01"]


@pytest.mark.slow
def test_moe_run_logs_diagnostics_counts_active_params_and_samples(tmp_path):
    run = tmp_path / "moe"
    result = lm("train", "--run-dir", str(run), *sets(*TINY, *MOE, "steps=6"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "active" in result.stdout.splitlines()[0]
    summary = json.loads((run / "summary.json").read_text())
    # 2 layers, one MoE: 2 of its 4 experts (2 x 32 x 64 weights each) are inactive.
    assert summary["params"] - summary["active_params"] == 2 * 2 * 32 * 64
    assert summary["active_non_embedding_params"] < summary["non_embedding_params"]
    record = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
              if '"train"' in l][-1]
    loads = [record[f"moe_load/1/{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    for key in ("moe_load_ratio/1", "moe_dropped/1", "moe_router_entropy/1",
                "moe_aux_loss/1", "moe_z_loss/1", "moe_bias/1/0", "aux_loss"):
        assert key in record, key
    assert "moe_load/0/0" not in record  # layer 0 is dense
    assert set(train_losses(run)) == {2, 4, 6}

    sample = lm("sample", "--run", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert sample.returncode == 0, sample.stderr[-2000:]
    evaluated = lm("eval", "--run", str(run))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["val_bpb"] > 0


@pytest.mark.parametrize("override, message", [
    ("model.moe.top_k=5", "model.moe.top_k=5"),
    ("model.moe.capacity_factor=-1", "model.moe.capacity_factor"),
    ("mesh.expert=3", "mesh.expert=3 does not divide model.moe.n_experts=4"),
])
def test_bad_moe_config_is_one_line_and_exit_2(tmp_path, lm_here, override, message):
    run = tmp_path / "run"
    result = lm_here("train", "--run-dir", str(run), *sets(*TINY, *MOE, "mesh.data=1", override))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run.exists()


@pytest.mark.slow
def test_moe_train_step_compiles_for_a_tpu_topology_with_expert_parallelism(tmp_path):
    out = tmp_path / "compile.json"
    result = lm("compile", "--topology", "v5p:2x2x1", "--train-only", "--json", str(out),
                *sets(*TINY, *MOE, "model.moe.impl=megablox", "mesh.data=2", "mesh.expert=2"),
                timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())[0]
    assert report["fits"]
    assert report["collectives"].get("all-to-all", {}).get("count", 0) > 0
    assert report["custom_calls"] > 0  # the megablox kernel, compiled by Mosaic


def test_load_imbalance_from_logged_loads():
    import pandas as pd

    from lm.analysis.moe import load_imbalance
    m = pd.DataFrame([
        {"step": 1, "kind": "train", "moe_load/1/0": 0.25, "moe_load/1/1": 0.75,
         "moe_load/3/0": 0.5, "moe_load/3/1": 0.5},
        {"step": 1, "kind": "eval", "loss": 3.0},
        {"step": 2, "kind": "train", "moe_load/1/0": 1.0, "moe_load/1/1": 0.0,
         "moe_load/3/0": 0.5, "moe_load/3/1": 0.5},
    ])
    imb = load_imbalance(m)
    assert imb["step"].tolist() == [1, 2]
    # n_experts x max load, averaged over layers 1 and 3: (1.5 + 1) / 2, (2 + 1) / 2
    np.testing.assert_allclose(imb["max_load"], [1.25, 1.5])
    assert load_imbalance(pd.DataFrame([{"step": 1, "kind": "train", "loss": 1.0}])).empty
