"""The update directions beyond AdamW: Lion, Adafactor, Muon, SGD-SaI. Each trains the
tiny overfit case; Lion and Adafactor equal optax's reference optimizers step for step;
Muon's Newton-Schulz output is near-orthogonal and equal under fsdp x tensor sharding;
SGD-SaI's scales equal their definition; state bytes, muP multipliers and bad settings."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, assert_train_refused, overfit_losses, sets
from flax import nnx

from lm.config import ModelConfig, OptimConfig
from lm.model import Transformer, param_axes
from lm.optim import decay_mask, lr_multipliers, make_optimizer, state_bytes_per_param
from lm.optim.muon import muon_dims, orthogonalize

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def chain(name: str, lr: float = 1e-2, weight_decay: float = 0.0, axes=None, model=MODEL,
          **section):
    cfg = OptimConfig(name=name, lr=lr, schedule="constant", warmup_steps=0,
                      weight_decay=weight_decay, clip_norm=0)
    if section:
        import dataclasses
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **section)})
    return make_optimizer(cfg, model, axes, total_steps=100)


# The lr each direction trains the overfit case with in 30 steps (Lion's sign updates
# want a smaller one, SGD-SaI's SNR-scaled momentum a larger one).
LRS = {"adamw": 1e-2, "lion": 5e-3, "adafactor": 1e-2, "muon": 2e-2, "sgd_sai": 3e-2}


@pytest.mark.parametrize("name", list(LRS))
def test_each_direction_overfits_a_tiny_batch(name):
    model = Transformer(MODEL, nnx.Rngs(0))
    tx = chain(name, LRS[name], axes=param_axes(model))
    x = jax.random.randint(jax.random.PRNGKey(7), (4, 17), 0, MODEL.vocab_size)
    losses = overfit_losses(model, tx, x, 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::5]


AXES = {"w": ("embed", "mlp"), "wq": ("embed", "heads", "head_dim"), "scale": ("embed",)}


def params_and_grads(steps: int, seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), steps + 1)
    shapes = {"w": (8, 12), "wq": (8, 2, 6), "scale": (8,)}
    make = lambda key: {n: jax.random.normal(jax.random.fold_in(key, i), s)  # noqa: E731
                        for i, (n, s) in enumerate(shapes.items())}
    return make(k[0]), [make(key) for key in k[1:]]


def run_updates(tx, params, grads):
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(params)
    return out


def assert_same_trajectory(a, b):
    for pa, pb in zip(a, b):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6)


def test_lion_equals_optax_lion_step_for_step():
    params, grads = params_and_grads(6)
    ours = chain("lion", lr=3e-3, weight_decay=0.5, axes=AXES, b1=0.8, b2=0.98)
    ref = optax.lion(3e-3, b1=0.8, b2=0.98, weight_decay=0.5, mask=decay_mask(AXES))
    assert_same_trajectory(run_updates(ours, params, grads), run_updates(ref, params, grads))


@pytest.mark.parametrize("momentum,param_scale", [(False, False), (True, True)])
def test_adafactor_equals_optax_adafactor_step_for_step(momentum, param_scale):
    params, grads = params_and_grads(6)
    ours = chain("adafactor", lr=1e-2, axes=AXES, min_dim_size_to_factor=4, momentum=momentum,
                 b1=0.9, multiply_by_parameter_scale=param_scale, clipping_threshold=1.0)
    ref = optax.adafactor(1e-2, min_dim_size_to_factor=4, clipping_threshold=1.0,
                          momentum=0.9 if momentum else None,
                          multiply_by_parameter_scale=param_scale)
    assert_same_trajectory(run_updates(ours, params, grads), run_updates(ref, params, grads))


def test_muon_newton_schulz_gives_singular_values_near_one():
    # A badly conditioned [embed, heads, head_dim] gradient (singular values 0.02 .. 1:
    # five steps of the quintic lift values down to ~1/500 of the Frobenius norm).
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(32, 32)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(24, 24)))
    s = np.geomspace(0.02, 1.0, 24)
    g = (u[:, :24] * s) @ v.T
    dims = muon_dims(("embed", "heads", "head_dim"))
    out = np.asarray(orthogonalize(jnp.asarray(g.reshape(32, 4, 6), jnp.float32), dims))
    sv = np.linalg.svd(out.reshape(32, 24), compute_uv=False)
    # Muon's quintic iteration (5 steps, Jordan's coefficients) lands singular values in
    # roughly [0.7, 1.2], not exactly 1, by design; the input spans 0.02 .. 1.
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    # The directions are the polar factor's: out ~ U V^T up to that per-value slack.
    polar = u[:, :24] @ v.T
    cos = np.sum(out.reshape(32, 24) * polar) / (np.linalg.norm(out) * np.linalg.norm(polar))
    assert cos > 0.95


def test_muon_routes_hidden_matrices_to_newton_schulz_and_the_rest_to_adam():
    axes = {"embed": ("vocab", "embed"), "wq": ("embed", "heads", "head_dim"),
            "stacked": ("layers", "embed", "mlp"), "norm": ("embed",), "conv": ("conv", "mlp")}
    shapes = {"embed": (16, 8), "wq": (8, 2, 4), "stacked": (3, 8, 16), "norm": (8,),
              "conv": (4, 16)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    grads = {k: jax.random.normal(jax.random.PRNGKey(i), s) for i, (k, s) in enumerate(shapes.items())}
    tx = chain("muon", lr=1.0, axes=axes)
    u, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -sign(g) (bias-corrected), entries of size ~1.
    for k in ("embed", "norm", "conv"):
        np.testing.assert_allclose(np.abs(u[k]), 1.0, rtol=1e-3)
    # Orthogonalised, scaled to RMS 0.2 * sqrt(max(fan_in, fan_out)) / sqrt(min) spectral.
    sv = np.linalg.svd(np.asarray(u["wq"]).reshape(8, 8), compute_uv=False)
    assert np.all(np.abs(sv / (0.2 * math.sqrt(8)) - 1) < 0.35), sv
    for layer in range(3):  # each stacked layer is its own matrix
        sv = np.linalg.svd(np.asarray(u["stacked"][layer]), compute_uv=False)
        assert np.all(np.abs(sv / (0.2 * math.sqrt(16)) - 1) < 0.35), sv




def test_sgd_sai_scales_equal_their_definition_on_a_hand_computed_gradient():
    axes = {"w": ("embed", "mlp"), "stacked": ("layers", "embed")}
    params = {"w": jnp.zeros((2, 2)), "stacked": jnp.zeros((2, 2))}
    g1 = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "stacked": jnp.array([[1.0, 3.0], [0.0, 4.0]])}
    g2 = {"w": jnp.array([[0.0, 1.0], [1.0, 0.0]]), "stacked": jnp.array([[1.0, 1.0], [2.0, 0.0]])}
    # ||g|| / std(g) (unbiased), by hand: w: sqrt(30) / sqrt(5/3) = 3 sqrt(2); per layer of
    # stacked: sqrt(10) / sqrt(2) = sqrt(5) and 4 / sqrt(8) = sqrt(2).
    snr = {"w": 3 * math.sqrt(2), "stacked": np.array([[math.sqrt(5)], [math.sqrt(2)]])}
    tx = chain("sgd_sai", lr=1.0, axes=axes, momentum=0.9, eps=0.0)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, params)
    for k in params:
        np.testing.assert_allclose(u1[k], -snr[k] * g1[k], rtol=1e-6)  # m_1 = g_1
        # The scale stays the first step's; the momentum averages.
        np.testing.assert_allclose(u2[k], -snr[k] * (0.9 * g1[k] + 0.1 * g2[k]), rtol=1e-6)


def test_state_bytes_per_parameter():
    params = {"w": jnp.zeros((256, 512)), "scale": jnp.zeros((256,))}
    axes = {"w": ("embed", "mlp"), "scale": ("embed",)}
    per_param = {name: state_bytes_per_param(chain(name, axes=axes).init(params), params)
                 for name in LRS}
    assert per_param["adamw"] == pytest.approx(8.0, abs=1e-3)
    assert per_param["lion"] == pytest.approx(4.0, abs=1e-3)
    assert per_param["sgd_sai"] == pytest.approx(4.0, abs=1e-3)  # half of AdamW's
    assert per_param["adafactor"] < 0.1  # rows + columns of the matrix, full for the vector
    assert per_param["muon"] == pytest.approx(4.0 + 4.0 * 256 / params["w"].size, abs=0.01)


def test_mup_multipliers_per_direction():
    cfg = ModelConfig(vocab_size=64, d_model=128, n_heads=2, n_layers=1, init="mup",
                      mup_base_width=32, max_seq_len=32)
    axes = param_axes(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    ratio = 32 / 128
    adam = lr_multipliers(axes, cfg, "adamw")
    muon = lr_multipliers(axes, cfg, "muon")
    sai = lr_multipliers(axes, cfg, "sgd_sai", OptimConfig().sgd_sai)
    attn, mlp = adam["blocks"][0]["mixer"], adam["blocks"][0]["channel"]
    assert attn["wq"] == mlp["w_in"] == ratio and adam["embed"] == 1.0
    assert muon["blocks"][0]["mixer"]["wq"] == pytest.approx(math.sqrt(ratio))
    assert muon["embed"] == 1.0  # the Adam part
    # SGD-SaI: Adam's rule x sqrt(size at base / size): (embed x heads x head_dim) grows
    # as width^2, the [vocab, embed] table and the norms as width.
    assert sai["blocks"][0]["mixer"]["wq"] == pytest.approx(ratio * ratio)
    assert sai["embed"] == pytest.approx(math.sqrt(ratio))
    assert sai["blocks"][0]["norm1"]["scale"] == pytest.approx(math.sqrt(ratio))
    # Mamba-2's depthwise conv has a fixed fan-in: vector-like under muP, multiplier 1.
    mamba = ModelConfig(vocab_size=64, d_model=128, n_heads=2, n_layers=1, init="mup",
                        mup_base_width=32, max_seq_len=32, mixer_pattern="m")
    m_axes = param_axes(nnx.eval_shape(lambda: Transformer(mamba, nnx.Rngs(0))))
    mixer = lr_multipliers(m_axes, mamba, "adamw")["blocks"][0]["mixer"]
    assert mixer["conv_x"] == 1.0 and mixer["w_x"] == ratio and mixer["a_log"] == 1.0
    # MoE: each expert's matrix and the router are hidden (fan-in embed), the bias is not.
    moe = {"w_in": ("experts", "embed", "expert_mlp"), "router": ("embed", "router"),
           "router_bias": ("router",), "stacked": ("layers", "experts", "expert_mlp", "embed")}
    got = lr_multipliers(moe, cfg, "adamw")
    assert got == {"w_in": ratio, "router": ratio, "router_bias": 1.0, "stacked": ratio}


BAD_OPTIM = [
    (["optim.name=adamz"], "optim.name='adamz': expected one of adamw, lion, adafactor, muon, sgd_sai"),
    (["optim.name=lion", "optim.lion.b1=-0.1"], "optim.lion.b1 must be in [0, 1)"),
    (["optim.name=muon", "optim.muon.beta=-0.5"], "optim.muon.beta must be in [0, 1)"),
    (["optim.name=sgd_sai", "optim.sgd_sai.momentum=-0.9"], "optim.sgd_sai.momentum must be in [0, 1)"),
    (["optim.name=adafactor", "optim.adafactor.b1=-0.1"], "optim.adafactor.b1 must be in [0, 1)"),
    (["model.init=mup", "optim.name=adafactor", "optim.adafactor.multiply_by_parameter_scale=true"],
     "model.init=mup: optim.name=adafactor has no muP rule"),
]


@pytest.mark.parametrize("overrides,message", BAD_OPTIM)
def test_bad_optimizer_settings_exit_2_with_one_line(tmp_path, lm_here, overrides, message):
    assert_train_refused(lm_here, tmp_path / "run", overrides, message)


def test_a_run_reports_its_optimizer_state_bytes(tmp_path, lm_here, name="sgd_sai",
                                                 per_param=4.0, rule="SGD-SaI"):
    # A real run: the state is created and sharded by lm.train (state shapes that are not
    # the parameters', e.g. per-block scales, are replicated) and trains.
    run = tmp_path / "run"
    result = lm_here("train", "--run-dir", str(run),
                     *sets(*TINY, "steps=2", "eval_every=2", "checkpoint_every=2",
                           f"optim.name={name}", "model.init=mup", "model.mup_base_width=16"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert per_param <= summary["optimizer_state_bytes_per_param"] < per_param + 0.02
    assert f"optimizer {name}: {per_param:.2f} state bytes per parameter; muP rule: {rule}" in result.stdout
