"""RoPE scaling (model.rope_scaling): each kind's inverse frequencies equal the formula
worked by hand for d=16, theta=1e4; the rotation uses them (position interpolation at
position p equals plain RoPE at p / factor; YaRN scales logits by attention_factor^2);
the section is settable, round-trips through config.json and rejects bad values."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_train_refused

from lm.config import ModelConfig, RopeScaling, TrainConfig, apply_overrides, from_json, to_json
from lm.model.layers import rope
from lm.model.rope_scaling import attention_factor, inv_freq

D, THETA = 16, 10_000.0
PLAIN = [10 ** (-i / 2) for i in range(8)]  # 1e4^(-2i/16)


def freqs(kind: str, **kw) -> np.ndarray:
    s = RopeScaling(type=kind, factor=4.0, original_max_seq_len=64, **kw)
    return inv_freq(D, THETA, s, 256)


def test_none_is_plain_rope():
    np.testing.assert_allclose(inv_freq(D, THETA, RopeScaling(), 256), PLAIN, rtol=1e-12)


def test_linear_divides_every_frequency_by_the_factor():
    np.testing.assert_allclose(freqs("linear"), np.array(PLAIN) / 4, rtol=1e-12)


def test_ntk_raises_the_base():
    # base' = 1e4 * 4^(16/14); the first frequency stays 1, the last is divided by the
    # factor exactly ((theta f^(d/(d-2)))^(-(d-2)/d) = theta^(-(d-2)/d) / f).
    base = THETA * 4 ** (16 / 14)
    f = freqs("ntk")
    np.testing.assert_allclose(f, [base ** (-i / 8) for i in range(8)], rtol=1e-12)
    assert f[0] == 1.0 and math.isclose(f[7], PLAIN[7] / 4, rel_tol=1e-12)
    assert math.isclose(f[1], 0.259412817, rel_tol=1e-8)


def test_yarn_ramps_from_extrapolation_to_interpolation():
    # Correction dims over 64 positions: beta_fast=32 -> floor(-0.994) -> 0, beta_slow=1 ->
    # ceil(2.016) = 3: ramp i/3 over i = 0..3, interpolation (/4) from i = 3 on.
    expected = [PLAIN[0], PLAIN[1] * (2 / 3 + 1 / 12), PLAIN[2] * (1 / 3 + 2 / 12)] + [
        p / 4 for p in PLAIN[3:]]
    np.testing.assert_allclose(freqs("yarn"), expected, rtol=1e-6)
    assert math.isclose(attention_factor(RopeScaling(type="yarn", factor=4.0)),
                        0.1 * math.log(4) + 1)
    assert attention_factor(RopeScaling(type="yarn", factor=4.0, attention_factor=1.5)) == 1.5
    assert attention_factor(RopeScaling(type="linear", factor=4.0)) == 1.0


def test_llama3_keeps_high_scales_low_and_blends_the_middle():
    # Wavelengths 2 pi / f: 6.3 (< 64/4: kept), 19.9 and 62.8 (between: blended with
    # smooth = (64 / wavelen - 1) / 3), 199 and up (> 64: divided by 4).
    def blended(f):
        smooth = (64 / (2 * math.pi / f) - 1) / 3
        return (1 - smooth) * f / 4 + smooth * f
    expected = [PLAIN[0], blended(PLAIN[1]), blended(PLAIN[2])] + [p / 4 for p in PLAIN[3:]]
    f = freqs("llama3", low_freq_factor=1.0, high_freq_factor=4.0)
    np.testing.assert_allclose(f, expected, rtol=1e-12)
    assert math.isclose(f[1], 0.2546479, rel_tol=1e-6)


@pytest.mark.parametrize("max_len", [None, 64])  # computed in the graph / the host table
def test_rope_rotates_with_the_scaled_frequencies(max_len):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, D))
    pos = jnp.array([[0, 4, 8, 12]])
    lin = RopeScaling(type="linear", factor=4.0)
    scaled = rope(x, pos, THETA, max_len, lin)
    plain = rope(x, pos // 4, THETA, max_len)  # position interpolation: p -> p / 4
    np.testing.assert_allclose(scaled, plain, atol=1e-5)
    yarn = RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)
    y = rope(x, pos, THETA, max_len, yarn)
    # The rotation keeps norms; YaRN's attention factor multiplies them.
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1),
                               jnp.linalg.norm(x, axis=-1) * attention_factor(yarn), rtol=1e-5)


def test_set_and_json_round_trip():
    cfg = apply_overrides(TrainConfig(), ["model.rope_scaling.type=yarn",
                                          "model.rope_scaling.factor=8",
                                          "model.rope_scaling.original_max_seq_len=256"])
    assert cfg.model.rope_scaling == RopeScaling(type="yarn", factor=8.0, original_max_seq_len=256)
    back = from_json(to_json(cfg))
    assert back == cfg and json.loads(to_json(cfg))["model"]["rope_scaling"]["type"] == "yarn"
    # A config.json written before the section existed still loads (the default).
    d = json.loads(to_json(TrainConfig()))
    del d["model"]["rope_scaling"]
    assert from_json(json.dumps(d)).model.rope_scaling == RopeScaling()
    assert dataclasses.replace(ModelConfig()).rope_scaling.type == "none"


@pytest.mark.parametrize("overrides,message", [
    (["model.rope_scaling.type=longrope"], "model.rope_scaling.type: expected one of"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"],
     "model.rope_scaling.factor must be >= 1"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"],
     "original_max_seq_len must be set"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.original_max_seq_len=32",
      "model.rope_scaling.low_freq_factor=4"], "low_freq_factor < high_freq_factor"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.beta_fast=0.5"],
     "beta_slow < beta_fast"),
    (["model.rope_scaling=yarn"], "'model.rope_scaling' is a section"),
])
def test_bad_rope_scaling_exits_2_with_one_line(tmp_path, lm_here, overrides, message):
    assert_train_refused(lm_here, tmp_path / "run", overrides, message)
