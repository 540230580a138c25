"""Quantized training (qwix, lm/compress/quantize.py) and weight-only PTQ: a rule at full
precision trains exactly like no quantization; int8 rules put int8 matmuls where they say
and nowhere else; PTQ's dequantized weights are within half a scale of the originals."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from lm.compress.ptq import dequantize_matrix, pack_int4, quantize_matrix, unpack_int4
from lm.compress.quantize import matmul_precision
from lm.config import ConfigError, resolve
from lm.train.state import build


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, t = cfg.batch_size, cfg.data.seq_len
    return {"inputs": rng.integers(0, 259, (b, t)).astype(np.int32),
            "targets": rng.integers(0, 259, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": np.ones((b, t), np.float32)}


def _pieces(*extra):
    return build(resolve("configs/default.py", TINY + ["model.vocab_size=259", *extra]))


def _losses(*extra, steps=3):
    pieces = _pieces(*extra)
    state, step, out = pieces.init_state(), pieces.train_step(), []
    for i in range(steps):
        state, metrics = step(state, pieces.global_batch(_batch(pieces.cfg, i)))
        out.append(float(metrics["loss"]))
    return out


def _int8_dots(pieces) -> list[str]:
    hlo = pieces.train_step().lower(pieces.abstract_state(), pieces.abstract_batch()).as_text()
    return [line for line in hlo.splitlines()
            if "dot_general" in line and re.search(r"tensor<[0-9x]+xi8>", line)]


def test_full_precision_rule_trains_like_no_quantization_and_int8_differs():
    base = _losses()
    # qwix intercepts every matmul, but a rule without a low-precision dtype computes
    # the original product: the losses are the unquantized ones, bit for bit.
    same = _losses("quant.mode=train", "quant.weight=none", "quant.act=none")
    assert same == base
    int8 = _losses("quant.mode=train")
    assert int8 != base  # the quantization is applied ...
    np.testing.assert_allclose(int8, base, rtol=0.05)  # ... and close at int8


def test_int8_matmuls_only_where_the_rules_say():
    assert not _int8_dots(_pieces())
    # Layer 0's sequence mixer only (attention: q, k, v, o projections, scores, values).
    only = _int8_dots(_pieces("quant.mode=train", "quant.rules=blocks/0/mixer",
                              "model.scan_layers=false"))
    assert len(only) == 6, only
    # Both layers' mixers (4 x attention + 2 MLP matmuls) minus the last block kept.
    both = _int8_dots(_pieces("quant.mode=train", "model.scan_layers=false"))
    kept = _int8_dots(_pieces("quant.mode=train", "model.scan_layers=false",
                              "quant.keep_last_blocks=1"))
    assert len(both) == 2 * 8 and len(kept) == 8
    # Weight matmuls only: no activation x activation product.
    weights_only = _int8_dots(_pieces("quant.mode=train", "quant.act_products=false",
                                      "model.scan_layers=false"))
    assert len(weights_only) == 2 * 6
    # The readout (the root module, ""): kept unless keep_readout=false.
    every = ("quant.mode=train", "quant.rules=.*", "model.scan_layers=false",
             "model.tie_embeddings=false", "loss_chunk=0")
    assert len(_int8_dots(_pieces(*every))) == len(both)
    assert len(_int8_dots(_pieces(*every, "quant.keep_readout=false"))) == len(both) + 1


@pytest.mark.parametrize("bad,message", [
    (["quant.rules=blocks/9/mixer"], "matches no module"),
    (["quant.weight=int3"], "quant.weight"),
    (["quant.rules=blocks/0/mixer=int8,fp16"], "unknown dtype 'fp16'"),
    (["quant.keep_last_blocks=1", "model.scan_layers=true"], "scan_layers=false"),
    (["distill.teacher=runs/teacher"], "does not combine with distillation"),
])
def test_bad_quant_configs_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        _pieces("quant.mode=train", *bad)


def test_mfu_peak_follows_the_matmul_dtype():
    cfg = resolve("configs/default.py", TINY + ["quant.mode=train"]).quant
    assert matmul_precision(cfg) == "int8"
    from dataclasses import replace
    assert matmul_precision(replace(cfg, weight="fp8_e4m3", act="fp8_e5m2")) == "fp8"
    assert matmul_precision(replace(cfg, act="none")) == "bf16"
    assert matmul_precision(replace(cfg, mode="off")) == "bf16"


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 16), (4, 0), (4, 8)])
def test_ptq_dequantizes_within_half_a_scale(bits, group):
    w = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    w[3, 5] = 9.0  # an outlier: its group's scale grows, others' do not
    q, scale = quantize_matrix(w, bits, group)
    assert q.dtype == np.int8 and np.abs(q).max() <= (127 if bits == 8 else 7)
    assert scale.shape == (64 // (group or 64), 24)
    deq = dequantize_matrix(q, scale)
    bound = np.repeat(scale, group or 64, axis=0) / 2
    assert np.all(np.abs(w - deq) <= bound * (1 + 1e-6))
    assert np.abs(w - deq).max() > 0
    if bits == 4:
        np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.size).reshape(q.shape), q)


def test_chip_peaks_for_quantized_matmuls():
    from lm.chips import CHIPS, for_device_kind
    assert for_device_kind("TPU v5p").peak("int8") == (918e12, "int8")
    assert CHIPS["H100"].peak("fp8") == (1979e12, "fp8")
    assert CHIPS["v6e"].peak("fp8") == (918e12, "bf16")  # no fp8 units: the bf16 peak
    assert CHIPS["v4"].peak("int8") == (275e12, "bf16")
