"""Schedules, independent weight decay and muP learning-rate multipliers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ModelConfig, OptimConfig
from lm.optim import lr_multipliers, make_optimizer, schedule


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    cfg = OptimConfig(lr=1.0, schedule=kind, warmup_steps=10, min_lr_ratio=0.1,
                      decay_fraction=0.2)
    lr = schedule(cfg, 100)
    values = np.array([float(lr(s)) for s in range(100)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)
    if kind == "constant":
        np.testing.assert_allclose(values[10:], 1.0)
    elif kind == "wsd":
        np.testing.assert_allclose(values[10:80], 1.0)
        assert values[-1] == pytest.approx(0.1)
        assert np.all(np.diff(values[80:]) < 0)
    else:
        assert np.all(np.diff(values[10:]) <= 1e-7)
        assert values[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("independent", [False, True])
def test_weight_decay_coupled_or_independent_of_lr(independent):
    cfg = OptimConfig(lr=0.01, schedule="constant", warmup_steps=0, weight_decay=0.5,
                      independent_weight_decay=independent, clip_norm=0)
    axes = {"w": ("embed", "mlp"), "scale": ("embed",)}
    tx = make_optimizer(cfg, ModelConfig(), axes, total_steps=10)
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zeros = {"w": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
    updates, _ = tx.update(zeros, tx.init(params), params)
    expected = 0.5 if independent else 0.5 * 0.01
    np.testing.assert_allclose(updates["w"], -expected)
    np.testing.assert_allclose(updates["scale"], 0.0)  # norms are not decayed


def test_mup_scales_hidden_matrix_lrs_only():
    axes = {"embed": ("vocab", "embed"), "wq": ("embed", "heads", "head_dim"),
            "stacked": ("layers", "embed", "mlp"), "norm": ("layers", "embed")}
    mup = lr_multipliers(axes, ModelConfig(init="mup", d_model=512, mup_base_width=128))
    assert mup == {"embed": 1.0, "wq": 0.25, "stacked": 0.25, "norm": 1.0}
    std = lr_multipliers(axes, ModelConfig(d_model=512))
    assert set(std.values()) == {1.0}
